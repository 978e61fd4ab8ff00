"""Triton's interpreter for the CPU tests of the kernels (test_kernels.py) and of the
decode blocks on them (test_fast_decode.py), and the helpers both use.

Without a GPU the kernels run in the interpreter (TRITON_INTERPRET=1, set before they are
imported; on a CUDA machine tests/gpu covers them compiled). Float16 only: the
interpreter computes bfloat16 wrongly (its tl.dot and arithmetic on bf16 gave garbage with
triton 3.9), so bf16 is checked on the GPU. Tolerance: TOLERANCE[float16] against float32.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from hybridgraph.kernels.selfcheck import TOLERANCE

# tests/conftest.py sets TRITON_INTERPRET=1 on a machine without CUDA before any test
# module loads; here it is only read, so the kernel tests skip rather than run compiled.
INTERPRET = (importlib.util.find_spec("triton") is not None and not torch.cuda.is_available()
             and os.environ.get("TRITON_INTERPRET") == "1")

needs_interpreter = pytest.mark.skipif(
    not INTERPRET, reason="needs triton and no GPU (tests/gpu covers the kernels compiled)")
F16 = torch.float16
TOL = TOLERANCE[F16]


def rnd(*shape: int, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape) * scale).to(F16)


def nan(*shape: int) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=F16)


def only_written(before: torch.Tensor, after: torch.Tensor, rows, pos) -> bool:
    """after equals before everywhere but cache[rows[i], :, pos[i]]."""
    restored = after.clone()
    restored[rows, :, pos] = before[rows, :, pos]
    return torch.equal(restored, before)
