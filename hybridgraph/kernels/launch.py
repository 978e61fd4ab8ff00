"""Every Triton launch of kernels/ goes through `launch`, so start-up can compile ahead.

A cold start compiles each kernel specialisation the graphs need (a GEMV per projection
and row bucket, attention per window, ...) one after another, inside the warm-up run of
the graph that first launches it. Inside `compile_ahead()` a launch only compiles, and
every compile is handed to a thread pool at once (Triton's AsyncCompileMode: the MLIR
passes run in C++ and ptxas in a subprocess, so threads overlap), so the caller can run
each step once "dry" to compile everything in parallel, then run or capture for real.
(docs/KERNELS.md run 14: 3-9 s off a 7B cold start; Inductor's compiles, not these,
are most of what remains.)

A dry run launches nothing: the outputs of the kernels hold whatever they held. Callers
must not read them (the graph runner restores its step state afterwards; collective
kernels are skipped on every rank alike, since every rank runs the same steps).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

_AHEAD: ContextVar[bool] = ContextVar("hybridgraph_compile_ahead", default=False)


def launch(kernel: Any, grid: tuple[int, ...], *args: Any, **kwargs: Any) -> None:
    """kernel[grid](*args, **kwargs), or inside `compile_ahead()` only its compile."""
    if _AHEAD.get():
        kernel.warmup(*args, grid=grid, **kwargs)
    else:
        kernel[grid](*args, **kwargs)


def compiling_ahead() -> bool:
    """True inside `compile_ahead()`: launches compile and do not run."""
    return _AHEAD.get()


def _async_mode() -> Any:
    """Triton's AsyncCompileMode class, or None where this Triton has none."""
    try:
        from triton.runtime._async_compile import AsyncCompileMode
    except ImportError:
        return None
    return AsyncCompileMode


@contextmanager
def compile_ahead(workers: int | None = None) -> Iterator[bool]:
    """Inside, launches compile on `workers` threads (default: one per CPU, at most 16)
    and run nothing; leaving waits for every compile (and raises the first error). Yields
    False, and changes nothing, where Triton cannot compile asynchronously: launches then
    run as usual."""
    mode = _async_mode()
    if mode is None or _AHEAD.get():  # unsupported, or already inside one
        yield False
        return
    workers = workers or max(1, min(16, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers, thread_name_prefix="triton-compile") as pool:
        with mode(pool):
            token = _AHEAD.set(True)
            try:
                yield True
            finally:
                _AHEAD.reset(token)
