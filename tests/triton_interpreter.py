"""Triton's interpreter for the CPU tests of the kernels (test_kernels.py, test_oneshot.py)
and of the decode blocks on them (test_fast_decode.py), and the helpers they use.

Without a GPU the kernels run in the interpreter (TRITON_INTERPRET=1, set before they are
imported; on a CUDA machine tests/gpu covers them compiled). Float16 only: the
interpreter computes bfloat16 wrongly (its tl.dot and arithmetic on bf16 gave garbage with
triton 3.9), so bf16 is checked on the GPU. Tolerance: TOLERANCE[float16] against float32.
"""

from __future__ import annotations

import importlib.util
import os
import threading
import time

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


class HostRanks:
    """`world` ranks' symmetric buffers and signal pads in host memory, for the one-shot
    all-reduce in the interpreter (tests/test_oneshot.py, tests/test_parallel_symm.py).

    The interpreter runs one launch at a time and its programs one after another, so the
    ranks cannot all run the kernel at once: `run` runs ONE rank's launch while a thread
    plays every peer's side of each call's barrier (signal, then consume the rank's
    signal), with the peers' partial sums already in both halves of their buffers. The kernel's own put/wait code runs
    for real, on real memory, against the same protocol its peers follow on a GPU.
    """

    def __init__(self, world: int, nbytes: int, pad_slots: int = 256) -> None:
        self.world = world
        self.buffers = [torch.zeros(nbytes, dtype=torch.uint8) for _ in range(world)]
        self.pads = [torch.zeros(pad_slots, dtype=torch.int32) for _ in range(world)]
        self.buffer_ptrs = torch.tensor([b.data_ptr() for b in self.buffers], dtype=torch.int64)
        self.signal_pads = torch.tensor([p.data_ptr() for p in self.pads], dtype=torch.int64)
        self.pad_bytes = pad_slots * 4
        self.states = [torch.zeros(2, dtype=torch.int32) for _ in range(world)]

    def fill(self, parts: list[torch.Tensor]) -> None:
        """Every rank's partial sum into both halves of its buffer (what its own copy-in
        would write, whichever half a call uses)."""
        from hybridgraph.kernels.oneshot import half_bytes
        for buf, part in zip(self.buffers, parts, strict=True):
            n = part.numel() * part.element_size()
            half = half_bytes(buf.numel())
            for at in (0, half):
                buf[at:at + n].view(part.dtype).copy_(part.reshape(-1))

    def _play_peers(self, rank: int, programs: int, calls: int, deadline: float) -> None:
        def until(pad: torch.Tensor, slot: int, value: int) -> None:
            while int(pad[slot]) != value:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"slot {slot} never became {value}")
                time.sleep(0.0002)

        peers = [p for p in range(self.world) if p != rank]
        for _ in range(calls):
            for b in range(programs):   # one barrier a call
                for p in peers:      # peer p's program b signals rank
                    until(self.pads[rank], b * self.world + p, 0)
                    self.pads[rank][b * self.world + p] = 1
                for p in peers:      # and consumes rank's signal to it
                    until(self.pads[p], b * self.world + rank, 1)
                    self.pads[p][b * self.world + rank] = 0

    def run(self, rank: int, programs: int, launch, calls: int = 1,
            timeout_s: float = 120.0):
        """launch() as rank `rank` (it makes `calls` kernel calls of `programs` programs)
        with its peers played; its result. A barrier that never completes fails here
        within timeout_s instead of hanging the test run."""
        deadline = time.monotonic() + timeout_s
        result: dict = {}

        def main() -> None:
            try:
                result["out"] = launch()
            except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
                result["error"] = e

        def peers() -> None:
            try:
                self._play_peers(rank, programs, calls, deadline)
            except BaseException as e:  # noqa: BLE001
                result["peer_error"] = e

        threads = [threading.Thread(target=f, daemon=True) for f in (peers, main)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        if any(t.is_alive() for t in threads):
            raise TimeoutError(f"rank {rank}'s barrier did not complete in {timeout_s} s")
        for key in ("error", "peer_error"):
            if key in result:
                raise result[key]
        return result["out"]

    def pads_clear(self) -> bool:
        return all(int(p.abs().sum()) == 0 for p in self.pads)
