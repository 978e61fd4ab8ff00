"""GraphCache: CUDA graphs of the step, captured into one shared pool, kept under limits.

Two halves. `GraphPolicy` is plain Python (keys, LRU order, limits, bucket lookup,
stats) so CI tests it without a GPU; `HeldGraphs` keeps captured graphs under it, still
without CUDA. `GraphCache` adds CUDA capture and replay.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

log = logging.getLogger(__name__)


class GraphKey(NamedTuple):
    phase: str     # "prefill" | "decode"
    batch: int     # batch bucket
    length: int    # prompt-length bucket (prefill) or attention window (decode)
    sampler: str   # "greedy" | "sample" when sampling is inside the graph, else "none"


# ------------------------------------------------------------------------- coverage

# pow2-fine adds the midpoints 3 * 2^k from here up: past ~256 tokens a prefill is
# compute-bound, so padding costs its share of time (llama-2-7b fp16 on an H100: a
# 300-token prompt took 13.5 ms padded to 512, 10.7 ms padded to 384), while below it the
# weights' read dominates and a coarser bucket costs little.
FINE_FROM = 384


def parse_coverage(spec: str, max_len: int) -> list[int]:
    """Prefill lengths that get graphs: exact | every:N | pow2 | pow2-fine | list:a,b,c
    (or "a,b,c")."""
    spec = spec.strip()
    if spec == "exact":
        lengths = list(range(1, max_len + 1))
    elif spec.startswith("every:"):
        try:
            n = int(spec.split(":", 1)[1])
        except ValueError:
            n = 0
        if n < 1:
            raise ValueError(f"bad coverage {spec!r}: every:N needs an integer N >= 1")
        lengths = list(range(n, max_len + 1, n))
    elif spec in ("pow2", "pow2-fine"):
        lengths, b = [], 1
        while b < max_len:
            lengths.append(b)
            if spec == "pow2-fine" and b * 3 // 2 >= FINE_FROM:
                lengths.append(b * 3 // 2)
            b *= 2
    else:
        body = spec.split(":", 1)[1] if spec.startswith("list:") else spec
        try:
            lengths = [int(x) for x in body.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"bad coverage {spec!r}: use exact, every:N, pow2, pow2-fine or a,b,c") from None
        if not lengths or min(lengths) < 1:
            raise ValueError(f"bad coverage {spec!r}: lengths must be >= 1")
    # The largest length is always covered, so every prompt that fits has a bucket.
    return sorted({x for x in lengths if x <= max_len} | {max_len})


# --------------------------------------------------------------------------- policy

@dataclass
class GraphStats:
    captures: int = 0
    capture_failures: int = 0
    evictions: int = 0
    hits: int = 0
    misses: int = 0
    fallbacks: int = 0          # steps run eagerly because no graph served them
    bytes_held: int = 0
    capture_ms: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class GraphPolicy:
    """LRU order and limits over graph keys; knows nothing about CUDA."""

    max_graphs: int | None = None
    max_bytes: int | None = None
    entries: OrderedDict[GraphKey, int] = field(default_factory=OrderedDict)  # key -> bytes
    stats: GraphStats = field(default_factory=GraphStats)

    def lookup(self, key: GraphKey) -> GraphKey | None:
        """The key itself if held, else the nearest larger length of the same kind."""
        if key in self.entries:
            self.entries.move_to_end(key)
            self.stats.hits += 1
            return key
        self.stats.misses += 1
        larger = [k for k in self.entries
                  if k[:2] == key[:2] and k.sampler == key.sampler and k.length > key.length]
        if larger:
            best = min(larger, key=lambda k: k.length)
            self.entries.move_to_end(best)
            return best
        return None

    def fits(self, nbytes: int) -> bool:
        return self.max_bytes is None or nbytes <= self.max_bytes

    def victims(self, incoming_bytes: int = 0) -> list[GraphKey]:
        """Least recently used keys to drop so one more graph of incoming_bytes fits."""
        out: list[GraphKey] = []
        count, total = len(self.entries), self.stats.bytes_held
        for k, nbytes in self.entries.items():
            over_count = self.max_graphs is not None and count + 1 > self.max_graphs
            over_bytes = self.max_bytes is not None and total + incoming_bytes > self.max_bytes
            if not (over_count or over_bytes):
                break
            out.append(k)
            count -= 1
            total -= nbytes
        return out

    def add(self, key: GraphKey, nbytes: int) -> None:
        """Hold key (replacing it if held) as the most recently used."""
        self.stats.bytes_held += nbytes - self.entries.pop(key, 0)
        self.entries[key] = nbytes

    def remove(self, key: GraphKey) -> None:
        self.stats.bytes_held -= self.entries.pop(key)
        self.stats.evictions += 1


# ----------------------------------------------------------------------------- CUDA

@dataclass
class CapturedGraph:
    graph: torch.cuda.CUDAGraph
    output: Any                 # whatever the captured function returned (static tensors)
    nbytes: int


class HeldGraphs:
    """The store half of GraphCache: captured graphs by key, kept under a GraphPolicy. It
    makes no CUDA call, so the runner's CPU tests capture stand-in graphs into it."""

    def __init__(self, max_graphs: int | None = None, max_bytes: int | None = None) -> None:
        self.policy = GraphPolicy(max_graphs, max_bytes)
        self.graphs: dict[GraphKey, CapturedGraph] = {}

    @property
    def stats(self) -> GraphStats:
        return self.policy.stats

    def lookup(self, key: GraphKey) -> GraphKey | None:
        """The held key that serves `key` (itself, or a larger length), counted in stats."""
        return self.policy.lookup(key)

    def __contains__(self, key: GraphKey) -> bool:
        return key in self.graphs

    def evict(self, key: GraphKey) -> None:
        self.graphs.pop(key)
        self.policy.remove(key)

    def hold(self, key: GraphKey, entry: CapturedGraph) -> CapturedGraph:
        """Keep a freshly captured graph, counted as a capture."""
        self.graphs[key] = entry
        self.policy.add(key, entry.nbytes)
        self.stats.captures += 1
        return entry


class GraphCache(HeldGraphs):
    """Capture, replay and evict CUDA graphs of step functions under the policy's limits."""

    def __init__(self, max_graphs: int | None = None, max_bytes: int | None = None,
                 shared_pool: bool = True, warmup_iters: int = 2) -> None:
        super().__init__(max_graphs, max_bytes)
        self.failed: set[GraphKey] = set()  # not retried: each try costs warm-ups and time
        self.shared_pool = shared_pool
        self.pool = torch.cuda.graph_pool_handle() if shared_pool else None
        self.warmup_iters = warmup_iters
        # One stream for every warm-up and capture: libraries cache per-stream state (the
        # cuBLAS workspace), and a fresh stream per capture would leak one per graph.
        self.stream = torch.cuda.Stream()

    def clear(self) -> None:
        """Evict every graph; with none left, the shared pool is dropped too, so
        torch.cuda.empty_cache() can hand all of its memory back."""
        for key in list(self.graphs):
            self.evict(key)
        self.failed.clear()
        if self.shared_pool:
            self.pool = torch.cuda.graph_pool_handle()

    def capture(self, key: GraphKey, fn: Callable[[], Any],
                prepare: Callable[[], None] | None = None) -> CapturedGraph | None:
        """Warm fn up on a side stream, then capture it. Returns None (and counts a
        failure) when capture fails or the graph cannot fit the byte budget.

        prepare() runs before each warm-up call: callers use it to restore state that
        fn mutates, so capturing never changes what a request computes.
        """
        if key in self.graphs:
            return self.graphs[key]
        if key in self.failed:
            return None
        for victim in self.policy.victims(0):  # make room under max_graphs before capturing
            self.evict(victim)
        t0 = time.perf_counter()
        torch.cuda.synchronize()
        before = torch.cuda.memory_reserved()
        pool = self.pool if self.shared_pool else torch.cuda.graph_pool_handle()
        try:
            side = self.stream
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(self.warmup_iters):
                    if prepare is not None:
                        prepare()
                    fn()
            torch.cuda.current_stream().wait_stream(side)
            if prepare is not None:
                prepare()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            allocated = torch.cuda.memory_allocated()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=side):
                output = fn()
            torch.cuda.synchronize()
        except Exception as e:  # OOM, an op that can't be captured: serve eagerly instead
            self.stats.capture_failures += 1
            self.failed.add(key)
            log.warning("capture of %s failed, serving it eagerly: %s", key, e)
            # A capture that raised leaves the caching allocator routing this stream's
            # allocations into its pool, and that pool then refuses every later capture
            # ("already recording to mempool_id", seen on torch 2.11). Abandon both: later
            # graphs go to a fresh pool on a fresh stream; graphs already held are intact.
            self.stream = torch.cuda.Stream()
            if self.shared_pool:
                self.pool = torch.cuda.graph_pool_handle()
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            return None
        # Two measurements: the graph's own working set (what it needs wherever it lives)
        # decides whether it can fit the budget at all; what the pool grew by is what
        # holding it costs, and a shared pool grows by less as graphs reuse its blocks.
        footprint = torch.cuda.max_memory_allocated() - allocated
        nbytes = max(0, torch.cuda.memory_reserved() - before)
        if not self.policy.fits(footprint):
            self.stats.capture_failures += 1
            self.failed.add(key)
            log.warning("graph %s needs %d bytes, over the budget of %d", key, footprint,
                        self.policy.max_bytes)
            del graph, output
            torch.cuda.empty_cache()
            return None
        for victim in self.policy.victims(nbytes):
            self.evict(victim)
        entry = self.hold(key, CapturedGraph(graph, output, nbytes))
        self.stats.capture_ms += (time.perf_counter() - t0) * 1e3
        return entry
