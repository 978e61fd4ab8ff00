"""Scratch memory shared by the split kernels: float32 partials and int32 tile counters.

A split kernel (GEMV split over K, attention split over keys) writes each split's partial
result here; the split that finishes a tile last (an atomic counter) sums them and runs the
epilogue, then sets the counter back to zero. So one launch does the work and its reduce,
and every launch leaves the counters as it found them: kernels that run one after another
on one stream (every layer, every graph replay) share one workspace. Allocated once, before
any capture, so captured graphs hold fixed addresses.
"""

from __future__ import annotations

import torch


class WorkspaceError(RuntimeError):
    """A launch needs more scratch than the workspace was sized for."""


class Workspace:
    def __init__(self, floats: int, counters: int, device: torch.device | str) -> None:
        self.partials = torch.empty(max(1, floats), dtype=torch.float32, device=device)
        self.counters = torch.zeros(max(1, counters), dtype=torch.int32, device=device)

    def check(self, floats: int, counters: int, what: str) -> None:
        if floats > self.partials.numel() or counters > self.counters.numel():
            raise WorkspaceError(
                f"{what} needs {floats} partial floats and {counters} counters; the workspace "
                f"holds {self.partials.numel()} and {self.counters.numel()}")
