"""The dynamic part of a step: fitting inputs to a captured shape, and sampling.

Prompts are fitted on the host (`fit_to_bucket`: numpy, one copy in). The samplers
are pure tensor functions with sampling parameters held as tensors, so the same code runs
eager, under torch.compile, under TorchScript, or captured inside a CUDA graph. Randomness is counter-based (a hash of seed, position and token id), not a
generator's state: the same seed gives the same tokens in every mode and backend, and a
graph replay needs no generator bookkeeping.
"""

from __future__ import annotations

import bisect
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
from torch import Tensor

from hybridgraph.runtime.modes import BACKENDS

R = TypeVar("R")

# ----------------------------------------------------------------------------- buckets

def pow2_buckets(lo: int, hi: int) -> list[int]:
    """Powers of two from lo up to and including the first one >= hi (capped at hi)."""
    out, b = [], max(1, lo)
    while b < hi:
        out.append(b)
        b *= 2
    out.append(hi)
    return sorted(set(out))


def choose_bucket(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= n. Buckets must be sorted ascending."""
    i = bisect.bisect_left(buckets, n)
    if i == len(buckets):
        raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")
    return buckets[i]


# ------------------------------------------------------------------------ preprocessing

def fit_to_bucket(prompts: Sequence[Sequence[int]], ids: np.ndarray, last: np.ndarray,
                  pad_id: int) -> list[int]:
    """Right-pad (or left-truncate) prompts into ids [rows, cols] (int64) and each row's
    last real index into last [rows], in place; returns the last indices.

    Rows beyond the prompts are one-token dummy prompts. A prompt longer than cols keeps
    its last cols tokens. The arrays are host memory the caller copies to the GPU once
    (StepBuffers.load_prompts: page-locked staging that outlives the request).

    On the host on purpose: a prompt arrives as a Python list, and padding it here with
    numpy costs a few µs. The compiled device version this replaced spent ~370 µs of host
    time per prefill (Dynamo's guards, three launches) on an H100 machine while the GPU
    sat idle waiting for the prefill graph (scripts/ttft_probe.py --host).
    """
    rows, cols = ids.shape
    if len(prompts) > rows:
        raise ValueError(f"{len(prompts)} prompts do not fit {rows} rows")
    ids.fill(pad_id)
    last[:rows] = 0
    for r, p in enumerate(prompts):
        if not len(p):
            raise ValueError(f"prompt {r} is empty")
        kept = p[-cols:]
        ids[r, :len(kept)] = kept
        last[r] = len(kept) - 1
    return last[:rows].tolist()


# ----------------------------------------------------------------------------- sampling

def _mix32(x: Tensor) -> Tensor:
    # A 32-bit integer hash done in int64 with multipliers < 2^27, so nothing overflows.
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & 0xFFFFFFFF
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def uniform_noise(seed: Tensor, counter: Tensor, vocab: int) -> Tensor:
    """U(0, 1) of shape [B, vocab], a pure function of (seed[b], counter[b], token id)."""
    s = _mix32((seed ^ (seed >> 32)) & 0xFFFFFFFF)
    c = _mix32((s ^ (counter & 0xFFFFFFFF)) & 0xFFFFFFFF)
    tok = torch.arange(vocab, device=seed.device, dtype=torch.int64)
    h = _mix32(c[:, None] ^ _mix32(tok)[None, :])
    return ((h >> 8).to(torch.float32) + 0.5) * (1.0 / 16777216.0)


@torch.library.custom_op("hybridgraph::cumsum_last", mutates_args=())
def cumsum_last(x: Tensor) -> Tensor:
    """cumsum over the last dim, kept opaque to Inductor: for one row of a large vocab it
    picks a split-scan kernel that cannot fuse with the reductions around it (NYI)."""
    return torch.cumsum(x, dim=-1)


@cumsum_last.register_fake
def _(x: Tensor) -> Tensor:
    return torch.empty_like(x)


def _into(tok: Tensor, out: Tensor | None) -> Tensor:
    if out is None:
        return tok
    return out.copy_(tok)


def greedy(logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor, seed: Tensor,
           counter: Tensor, out: Tensor | None = None) -> Tensor:
    """Argmax; the parameters are taken so every sampler has one signature."""
    return _into(torch.argmax(logits, dim=-1), out)


def sample(logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor, seed: Tensor,
           counter: Tensor, out: Tensor | None = None) -> Tensor:
    """Per-row sampling: temperature 0 is greedy; top_k 0 and top_p 1 switch those off.

    Gumbel-max over the kept tokens: argmax(logits / T - log(-log(u))) is a draw from
    softmax(logits / T) restricted to them.
    """
    vocab = logits.shape[-1]
    scaled = logits / torch.clamp(temperature, min=1e-6)[:, None]
    sorted_logits, sorted_idx = torch.sort(scaled, dim=-1, descending=True, stable=True)
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, vocab))
    drop = ranks >= k[:, None]
    probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    # Drop a token once the more likely ones already cover top_p (the first always stays).
    drop = drop | ((torch.ops.hybridgraph.cumsum_last(probs) - probs) > top_p[:, None])
    gumbel = -torch.log(-torch.log(uniform_noise(seed, counter, vocab)))
    score = sorted_logits.masked_fill(drop, float("-inf")) + gumbel.gather(1, sorted_idx)
    drawn = sorted_idx.gather(1, torch.argmax(score, dim=-1, keepdim=True))[:, 0]
    return _into(torch.where(temperature > 0, drawn, torch.argmax(logits, dim=-1)), out)


# sampler(logits, temperature, top_k, top_p, seed, counter, out=None) -> tokens [B] int64.
# Given `out` (the step's token buffer), the tokens are written there and it is returned:
# the Triton samplers write it directly, with no copy launch after them.
Sampler = Callable[..., Tensor]


@dataclass(frozen=True)
class DynamicOps:
    """The samplers under one backend."""

    backend: str
    greedy: Sampler
    sample: Sampler

    def sampler(self, kind: str) -> Sampler:
        return self.greedy if kind == "greedy" else self.sample


_CACHE: dict[str, DynamicOps] = {}


def dynamic_ops(backend: str = "compile") -> DynamicOps:
    """The sampling functions compiled by `backend` (built once)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown dynamic backend {backend!r}; choose from {BACKENDS}")
    if backend not in _CACHE:
        if backend == "eager":
            ops = DynamicOps("eager", greedy, sample)
        elif backend == "torchscript":
            ops = DynamicOps("torchscript", torch.jit.script(greedy), torch.jit.script(sample))
        else:
            # dynamic=False: one specialised kernel per batch bucket, nothing symbolic
            # to guard at replay time; fullgraph so a graph break is an error, not a slowdown.
            ops = DynamicOps("compile", lazy_compile(greedy, dynamic=False, fullgraph=True),
                             lazy_compile(sample, dynamic=False, fullgraph=True))
        _CACHE[backend] = ops
    return _CACHE[backend]


def lazy_compile(fn: Callable[..., R], **options: Any) -> Callable[..., R]:
    """torch.compile(fn, **options), built at its first call. Importing Dynamo and Inductor
    takes 1-1.5 s, which a process that never calls fn should not pay at start-up: a
    hybrid engine on the Triton kernels runs both samplers and every block of <= 16 rows
    on kernels of its own."""
    compiled: list[Callable[..., R]] = []

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> R:
        if not compiled:
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            compiled.append(torch.compile(fn, **options))
        return compiled[0](*args, **kwargs)

    return call
