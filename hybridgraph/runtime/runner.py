"""GraphRunner: the one owner of an engine's CUDA graphs.

The engine asks it for a step (`plan`), fills the step buffers to the planned shape, and
has it `run` the step: a held graph is replayed, or else the very same step function runs
eagerly. Everything about graphs lives here: which key a step needs, which held graph
serves it (the nearest larger bucket serves too: padding is masked), what a miss does
(the capture policy, as data), captures (ahead, on demand, deferred to idle time) and
their stats. `GraphCache` (graphs.py) is the storage under it: capture mechanics, LRU,
limits, the shared pool. In modes without graphs the runner holds no cache and every
step runs eagerly at its exact shape.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol

import torch

from hybridgraph.runtime.dynamic import DynamicOps, choose_bucket, pow2_buckets
from hybridgraph.runtime.graphs import CapturedGraph, GraphCache, GraphKey
from hybridgraph.runtime.modes import CapturePolicy, ModeSpec
from hybridgraph.runtime.step import Steps

# With no byte budget given, graphs may hold this fraction of the GPU memory that is free
# once the weights and the KV cache are allocated: the rest stays for eager fallbacks,
# activations and the allocator's fragmentation. Past the budget, least recently used
# graphs are evicted; a graph that alone exceeds it is served eagerly.
GRAPH_MEMORY_FRACTION = 0.5

log = logging.getLogger(__name__)


def default_graph_bytes(device: torch.device) -> int:
    free, _total = torch.cuda.mem_get_info(device)
    return max(1, int(free * GRAPH_MEMORY_FRACTION))


def decode_windows(max_seq_len: int) -> list[int]:
    """Attention windows that decode graphs are keyed by: powers of two from 256 (or the
    cache length, if smaller) up to the cache length, so a step past position 256 reads
    at most twice the keys it needs, not the whole cache."""
    return pow2_buckets(min(256, max_seq_len), max_seq_len)


class StepPlan(NamedTuple):
    key: GraphKey              # the step asked for, with its shape bucketed
    served: GraphKey | None    # the held graph that runs it (maybe a larger bucket); None: eager
    length: int                # the shape it runs at: prompt columns (prefill) or window (decode)
    kind: str                  # the request's sampler: "greedy" | "sample"


class StepObserver(Protocol):
    """Told of every step and capture before it happens (tensor parallelism's leader
    forwards them to the other ranks, which must run the same steps: parallel/control.py)."""

    def on_run(self, plan: StepPlan) -> None: ...

    def on_capture(self, key: GraphKey) -> None: ...


class GraphRunner:
    def __init__(self, steps: Steps, ops: DynamicOps, spec: ModeSpec, policy: CapturePolicy, *,
                 batch_buckets: Sequence[int], windows: Sequence[int],
                 prefill_lengths: Sequence[int], max_graphs: int | None = None,
                 max_graph_bytes: int | None = None, shared_pool: bool = True,
                 cache: GraphCache | None = None) -> None:
        """`cache`: a store to use instead of a new GraphCache (tests run the runner's
        logic on the CPU over a stand-in)."""
        self.steps, self.ops, self.spec, self.policy = steps, ops, spec, policy
        self.batch_buckets, self.windows = list(batch_buckets), list(windows)
        self.prefill_lengths = list(prefill_lengths)
        self.cache: GraphCache | None = cache
        self.pending: set[GraphKey] = set()   # missed keys, captured when idle ("defer")
        self.observer: StepObserver | None = None
        self.compile_s = 0.0                  # seconds spent in compile_ahead's dry passes
        if spec.uses_graphs and cache is None:
            if max_graph_bytes is None:
                max_graph_bytes = default_graph_bytes(steps.bufs.ids.device)
            self.cache = GraphCache(max_graphs, max_graph_bytes, shared_pool)

    # ------------------------------------------------------------------------ keys

    def key(self, phase: str, batch: int, n: int, kind: str) -> GraphKey:
        """The graph a step needs: n (prompt length, or positions a decode attends to) goes
        up to its bucket; the sampler is named only where sampling is inside the graph."""
        buckets = self.prefill_lengths if phase == "prefill" else self.windows
        sampler = kind if phase == "decode" and self.spec.sampling_in_graph else "none"
        return GraphKey(phase, batch, choose_bucket(n, buckets), sampler)

    def keys(self, lengths: Sequence[int] | None = None) -> list[GraphKey]:
        """Every graph the coverage strategy asks for, largest first (one shared pool)."""
        samplers = ("greedy", "sample") if self.spec.sampling_in_graph else ("none",)
        keys = [GraphKey("decode", b, w, s) for b in self.batch_buckets for w in self.windows
                for s in samplers]
        keys += [GraphKey("prefill", b, n, "none") for b in self.batch_buckets
                 for n in (lengths if lengths is not None else self.prefill_lengths)]
        return sorted(keys, key=lambda k: (k.batch * k.length, k.phase), reverse=True)

    def held_keys(self) -> list[GraphKey]:
        return list(self.cache.graphs) if self.cache is not None else []

    # -------------------------------------------------------------- lookup and run

    def lookup(self, key: GraphKey) -> GraphKey | None:
        """The held key that serves `key`, after applying the miss policy; None: eager."""
        assert self.cache is not None
        found = self.cache.lookup(key)  # a larger bucket serves too: padding is masked
        if found is not None:
            return found
        if self.policy.on_miss == "capture":
            if self.capture(key) is not None:
                return key
        elif self.policy.on_miss == "defer":
            self.pending.add(key)
        self.cache.stats.fallbacks += 1
        return None

    def plan(self, phase: str, batch: int, n: int, kind: str) -> StepPlan:
        """How a step over batch bucket `batch` and n prompt tokens (prefill) or n attended
        positions (decode) runs. The engine fills the step buffers to `plan.length`."""
        if self.cache is None:  # no graphs: the exact shape, no padding
            return StepPlan(GraphKey(phase, batch, n, "none"), None, n, kind)
        key = self.key(phase, batch, n, kind)
        served = self.lookup(key)
        if served is not None:
            return StepPlan(key, served, served.length, kind)
        # Eager: a prompt runs unpadded; a decode keeps its window (one compiled shape each).
        return StepPlan(key, None, n if phase == "prefill" else key.length, kind)

    def run(self, plan: StepPlan) -> None:
        """Run the planned step: replay its graph, or the same step function eagerly; then
        sample, where sampling is not inside the graph. Results land in the step buffers."""
        b = plan.key.batch
        if self.observer is not None:
            self.observer.on_run(plan)
        if plan.served is not None:
            assert self.cache is not None
            entry = self.cache.graphs[plan.served]
            entry.graph.replay()
            out = entry.output
        else:
            out = self.step_fn(plan.key._replace(length=plan.length))()
        if plan.key.sampler == "none":
            finish = (self.steps.finish_prefill if plan.key.phase == "prefill"
                      else self.steps.finish_decode)
            finish(out, b, self.ops.sampler(plan.kind))

    def step_fn(self, key: GraphKey) -> Callable[[], Any]:
        """The function a graph of `key` captures, and what runs eagerly in its place."""
        steps, b, n = self.steps, key.batch, key.length
        if key.phase == "prefill":
            return lambda: steps.forward_prefill(b, n)
        if key.sampler == "none":
            return lambda: steps.forward_decode(b, n)
        sampler = self.ops.sampler(key.sampler)
        return lambda: steps.finish_decode(steps.forward_decode(b, n), b, sampler)

    # --------------------------------------------------------------------- capture

    def capture(self, key: GraphKey) -> CapturedGraph | None:
        """Capture without disturbing a request in flight: warm-ups run on a snapshot of the
        step state, restored before the capture and after it."""
        assert self.cache is not None
        if self.observer is not None:
            self.observer.on_capture(key)
        bufs = self.steps.bufs
        snap = bufs.snapshot()
        with torch.inference_mode():
            entry = self.cache.capture(key, self.step_fn(key),
                                       prepare=lambda: self._prepare(key, snap))
        bufs.restore(snap)
        return entry

    def _prepare(self, key: GraphKey, snap: tuple[torch.Tensor, ...]) -> None:
        """The step state a warm-up or capture of `key` starts from: the snapshot."""
        self.steps.bufs.restore(snap)
        if key.phase == "prefill":  # a stale last index may lie past this bucket
            self.steps.bufs.last_idx.clamp_(max=key.length - 1)

    def compile_ahead(self, keys: Sequence[GraphKey]) -> bool:
        """Run each key's step once dry (kernels/launch.py): the Triton kernels they launch
        compile all at once on a thread pool instead of one by one in the captures'
        warm-ups, then nothing is launched. Only where the steps run the Triton kernels.
        The step state is restored afterwards. True if it compiled ahead."""
        if self.steps.kernels != "triton" or not keys:
            return False
        if self.observer is not None:  # the other ranks would not run these steps with us
            return False
        from hybridgraph.kernels.launch import compile_ahead

        t0, snap = time.perf_counter(), self.steps.bufs.snapshot()
        with torch.inference_mode(), compile_ahead() as ahead:
            if ahead:
                for key in keys:
                    self._prepare(key, snap)
                    try:
                        self.step_fn(key)()
                    except Exception as e:  # the capture meets it again, and counts it
                        log.debug("dry step of %s failed: %s", key, e)
        self.steps.bufs.restore(snap)
        self.compile_s += time.perf_counter() - t0
        return ahead

    def capture_ahead(self, lengths: Sequence[int] | None = None, progress: bool = False,
                      after_dry_pass: Callable[[], None] | None = None) -> int:
        """Capture the graphs for prefill `lengths` (default: every key of the coverage
        strategy). after_dry_pass runs between the dry pass and the first capture (Engine:
        the kernels' self-check, overlapped with the dry pass's compiles). Returns how many
        graphs are held afterwards."""
        if self.cache is None:
            return 0
        keys = [k for k in self.keys(lengths) if k not in self.cache]
        if lengths is not None:
            keys = [k for k in keys if k.phase == "prefill"]
        self.compile_ahead(keys)
        if after_dry_pass is not None:
            after_dry_pass()
        if progress:
            from tqdm import tqdm
            keys = tqdm(keys, desc="capturing graphs", unit="graph")
        for key in keys:
            self.capture(key)
        return len(self.cache.graphs)

    def capture_pending(self, budget_s: float = 0.5) -> int:
        """Capture keys that steps missed, for up to budget_s. Returns how many ran."""
        done, t0 = 0, time.perf_counter()
        while self.pending and time.perf_counter() - t0 < budget_s:
            key = self.pending.pop()
            if self.cache is not None and key not in self.cache:
                self.capture(key)
                done += 1
        return done

    # ----------------------------------------------------------------------- stats

    def stats(self) -> dict[str, Any] | None:
        if self.cache is None:
            return None
        return {"held": len(self.cache.graphs), "pending": len(self.pending),
                "max_bytes": self.cache.policy.max_bytes, **self.cache.stats.as_dict()}
