"""How long one all-reduce takes at decode's message sizes: NCCL against one-shot
all-reduces over symmetric memory (GPUs), or gloo (CPUs).

Four methods on GPUs: `nccl`; `symm_mem_one_shot`, torch's own kernel alone on a buffer
already in symmetric memory (bf16/fp32 only: torch has no fp16 kernel), for comparison;
`oneshot_kernel`, our Triton kernel (kernels/oneshot.py) through the engine's staging
(`Staging.reduce`: its copy-in is inside the kernel), no residual, no custom-op dispatch;
and `symm_mem_engine`, the custom op the engine's blocks call with `--allreduce symm_mem`
(parallel/symm.py: the same kernel behind `hybridgraph::symm_all_reduce`), i.e. what
decode pays per call.

A decode step all-reduces [batch, hidden] activations twice per layer: a few KB to a
few hundred KB, where latency, not bandwidth, decides. NCCL's ring/tree needs several
steps; `one_shot_all_reduce` has every rank read every peer's buffer over NVLink once.
Both are timed eagerly and replayed from a CUDA graph (how decode runs them). Every rank
calls `measure` together (it is collective). NVLink multicast stays off: the ranks run
with NCCL_NVLS_ENABLE=0 and TORCH_SYMM_MEM_DISABLE_MULTICAST=1 (group.SAFE_ENV).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from hybridgraph.parallel import symm
from hybridgraph.parallel.group import TPGroup


@dataclass
class AllReduceTiming:
    method: str           # nccl | symm_mem_one_shot | oneshot_kernel | symm_mem_engine | gloo
    rows: int             # activation rows (the decode batch)
    nbytes: int
    eager_us: float       # per call, launched one by one
    graph_us: float       # per call, replayed from one CUDA graph (nan on the CPU)
    error: str = ""       # why this method could not run here ("" when it did)


def _cuda_us(fn: Callable[[], object], iters: int, group: TPGroup) -> tuple[float, float]:
    """(eager, graph-replayed) microseconds per call of fn on every rank at once."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    dist.barrier(group=group.group)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    eager = start.elapsed_time(end) * 1e3 / iters
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # a warm-up on the capture stream
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    with torch.cuda.graph(graph, stream=stream):
        for _ in range(iters):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    dist.barrier(group=group.group)
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    return eager, start.elapsed_time(end) * 1e3 / iters


def _nccl(group: TPGroup, numel: int, dtype: torch.dtype, iters: int) -> tuple[float, float]:
    x = torch.zeros(numel, dtype=dtype, device=group.device)  # zeros: sums stay finite
    return _cuda_us(lambda: dist.all_reduce(x, group=group.group), iters, group)


def _symm_mem(group: TPGroup, numel: int, dtype: torch.dtype, iters: int,
              ) -> tuple[float, float]:
    import torch.distributed._symmetric_memory as symm_mem

    name = group.group.group_name
    symm.enable(name)
    buf = symm_mem.empty(numel, dtype=dtype, device=group.device)
    buf.zero_()
    symm_mem.rendezvous(buf, name)
    op = torch.ops.symm_mem.one_shot_all_reduce
    return _cuda_us(lambda: op(buf, "sum", name), iters, group)


def _with_staging(group: TPGroup, numel: int, dtype: torch.dtype,
                  fn: Callable[[symm.Staging, torch.Tensor], object], iters: int,
                  ) -> tuple[float, float]:
    """fn(staging, x) timed over a fresh staging of numel elements (the engine's, if any,
    put back after)."""
    name = group.group.group_name
    before = symm.registered(name)
    staging = symm.create(group.group, group.device, numel, [dtype])
    try:
        x = torch.zeros(numel, dtype=dtype, device=group.device)
        if staging.refusal(x):
            raise RuntimeError(staging.refusal(x))
        return _cuda_us(lambda: fn(staging, x), iters, group)
    finally:   # leave the group's own staging (an engine's, if any) as it was
        if before is not None:
            symm.register(before)
        else:
            symm.drop(name)


def _oneshot(group: TPGroup, numel: int, dtype: torch.dtype, iters: int,
             ) -> tuple[float, float]:
    """Our one-shot kernel through the engine's staging, without the custom op."""
    return _with_staging(group, numel, dtype, lambda st, x: st.reduce(x), iters)


def _symm_engine(group: TPGroup, numel: int, dtype: torch.dtype, iters: int,
                 ) -> tuple[float, float]:
    """The engine's symm_mem all-reduce: the custom op over its staging."""
    op = torch.ops.hybridgraph.symm_all_reduce
    return _with_staging(group, numel, dtype, lambda st, x: op(x, st.name), iters)


def _gloo(group: TPGroup, numel: int, dtype: torch.dtype, iters: int) -> tuple[float, float]:
    x = torch.zeros(numel, dtype=dtype)
    for _ in range(3):
        dist.all_reduce(x, group=group.group)
    dist.barrier(group=group.group)
    t0 = time.perf_counter()
    for _ in range(iters):
        dist.all_reduce(x, group=group.group)
    return (time.perf_counter() - t0) * 1e6 / iters, float("nan")


def measure(group: TPGroup, hidden: int, dtype: torch.dtype, rows: Sequence[int] = (1, 8, 64),
            iters: int = 200) -> list[AllReduceTiming]:
    """Per-call times at [rows, hidden] for each method this device has (collective)."""
    if group.device.type == "cuda":
        methods = {"nccl": _nccl, "symm_mem_one_shot": _symm_mem,
                   "oneshot_kernel": _oneshot, "symm_mem_engine": _symm_engine}
    else:
        methods = {"gloo": _gloo}
        iters = min(iters, 50)
    out = []
    for name, fn in methods.items():
        for r in rows:
            numel = r * hidden
            nbytes = numel * torch.tensor([], dtype=dtype).element_size()
            try:
                eager, graph = fn(group, numel, dtype, iters)
                out.append(AllReduceTiming(name, r, nbytes, eager, graph))
            except Exception as e:  # noqa: BLE001 - a method this host lacks is a result
                # Every rank fails the same way here (same build, same topology), so the
                # ranks stay in step; the failure is recorded, not fatal.
                out.append(AllReduceTiming(name, r, nbytes, float("nan"), float("nan"),
                                           f"{type(e).__name__}: {e}"[:200]))
    return out
