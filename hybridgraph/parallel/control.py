"""Rank 0 leads, the other ranks follow: the same steps, in the same order, on every rank.

Rank 0 owns the front (CLI, socket server, bench) and an ordinary Engine whose runner
has a `Leader` as its observer: before each step or capture it broadcasts a small header
on the control group (host memory, gloo), and before a prefill it broadcasts that step's
inputs (the fitted prompt, last indices and the sampling parameters) on the device group.
The other ranks run `follow`: read a header, run the very step it names with the very
shape it names (so every rank's all-reduces match in order and size), repeat.

Decode needs no inputs: every rank holds the same replicated LM head and the same
all-reduced activations, so it samples the same token from the same counter-based
randomness and advances its own buffers exactly as rank 0 does.

Both engines are built the same way, so their start-up (capture ahead, JIT warm-up) is
the same sequence of steps on every rank and needs no messages. While idle, the leader
sends heartbeats (group.heartbeat_s), so a follower's wait is bounded by the control
group's timeout even on a server that has no requests.
"""

from __future__ import annotations

import atexit
import threading
import time

import torch
import torch.distributed as dist

from hybridgraph.engine import Engine
from hybridgraph.parallel.group import TPGroup, heartbeat_s
from hybridgraph.runtime.graphs import GraphKey
from hybridgraph.runtime.runner import StepPlan

NOOP, RUN, CAPTURE, STOP = 0, 1, 2, 3
PHASES = ("prefill", "decode")
SAMPLERS = ("none", "greedy", "sample")
KINDS = ("greedy", "sample")
HEADER_LEN = 8  # op, phase, batch, key length, sampler, run length, served length, kind


def encode(op: int, key: GraphKey | None = None, length: int = 0,
           served: GraphKey | None = None, kind: str = "greedy") -> torch.Tensor:
    h = torch.zeros(HEADER_LEN, dtype=torch.int64)
    h[0] = op
    if key is not None:
        h[1:5] = torch.tensor([PHASES.index(key.phase), key.batch, key.length,
                               SAMPLERS.index(key.sampler)])
        h[5] = length
        h[6] = served.length if served is not None else 0
        h[7] = KINDS.index(kind)
    return h


def decode_header(h: torch.Tensor) -> tuple[int, GraphKey, int, GraphKey | None, str]:
    """(op, key, run length, served key or None, kind) from a header."""
    v = h.tolist()
    key = GraphKey(PHASES[v[1]], v[2], v[3], SAMPLERS[v[4]])
    served = key._replace(length=v[6]) if v[6] else None
    return v[0], key, v[5], served, KINDS[v[7]]


def step_inputs(engine: Engine, phase: str, b: int, t: int) -> tuple[list[torch.Tensor],
                                                                      list[torch.Tensor]]:
    """(int64, float32) buffers a step reads that the host wrote: a prefill's prompt and
    last indices, and the request's sampling parameters. Decode reads none."""
    s = engine.bufs
    if phase != "prefill":
        return [], []
    return ([s.prompt_ids[:b, :t], s.last_idx[:b], s.top_k[:b], s.seed[:b]],
            [s.temperature[:b], s.top_p[:b]])


def _broadcast_inputs(engine: Engine, group: TPGroup, phase: str, b: int, t: int) -> None:
    """Rank 0's inputs into every rank's buffers, packed in one broadcast per dtype (on the
    device group: no host synchronisation on the leader)."""
    for bufs in step_inputs(engine, phase, b, t):
        if not bufs:
            continue
        if group.leader:
            packed = torch.cat([x.reshape(-1) for x in bufs])
        else:
            packed = torch.empty(sum(x.numel() for x in bufs), dtype=bufs[0].dtype,
                                 device=bufs[0].device)
        dist.broadcast(packed, src=0, group=group.group)
        if not group.leader:
            offset = 0
            for x in bufs:
                x.copy_(packed[offset:offset + x.numel()].view_as(x))
                offset += x.numel()


class Leader:
    """The observer on rank 0's runner: tells the followers every step and capture."""

    def __init__(self, engine: Engine, group: TPGroup) -> None:
        self.engine, self.group = engine, group
        self.lock = threading.Lock()
        self.last_send = time.monotonic()
        self.stopped = False
        self.heartbeat_s = heartbeat_s()
        self._beat = threading.Thread(target=self._heartbeat, name="tp-heartbeat", daemon=True)
        self._beat.start()

    def _send(self, header: torch.Tensor) -> None:
        with self.lock:
            if self.stopped:
                raise RuntimeError("tensor-parallel group already stopped")
            dist.broadcast(header, src=0, group=self.group.control)
            self.last_send = time.monotonic()

    def _heartbeat(self) -> None:
        while True:
            time.sleep(self.heartbeat_s / 4)
            with self.lock:
                if self.stopped:
                    return
                if time.monotonic() - self.last_send < self.heartbeat_s:
                    continue
                try:
                    dist.broadcast(encode(NOOP), src=0, group=self.group.control)
                except RuntimeError:
                    return  # the group is down; the main thread's next step reports it
                self.last_send = time.monotonic()

    def on_run(self, plan: StepPlan) -> None:
        self._send(encode(RUN, plan.key, plan.length, plan.served, plan.kind))
        _broadcast_inputs(self.engine, self.group, plan.key.phase, plan.key.batch, plan.length)

    def on_capture(self, key: GraphKey) -> None:
        self._send(encode(CAPTURE, key))

    def stop(self) -> None:
        """Release the followers (they return from `follow`). Idempotent."""
        with self.lock:
            if self.stopped:
                return
            self.stopped = True
            dist.broadcast(encode(STOP), src=0, group=self.group.control)


def lead(engine: Engine, group: TPGroup) -> Leader:
    """Make rank 0's engine the leader; followers are released at exit at the latest."""
    leader = Leader(engine, group)
    engine.runner.observer = leader
    atexit.register(_stop_quietly, leader)
    return leader


def _stop_quietly(leader: Leader) -> None:
    """At exit: release the followers, then close the group as a follower does
    (`follow_main`), so the interpreter's teardown never destroys a live gloo group under
    the heartbeat thread (seen once: rank 0 aborted at exit under torchrun on the CPU,
    "terminate called without an active exception", after its work was done)."""
    try:
        leader.stop()
    except RuntimeError:
        pass  # a follower is gone already: nothing left to release
    leader._beat.join(timeout=leader.heartbeat_s)  # it returns once it sees `stopped`
    leader.group.close()


def follow(engine: Engine, group: TPGroup) -> int:
    """Run rank 0's steps until it stops; returns how many steps ran."""
    runner, steps = engine.runner, 0
    header = torch.zeros(HEADER_LEN, dtype=torch.int64)
    with torch.inference_mode():
        while True:
            dist.broadcast(header, src=0, group=group.control)
            op, key, length, served, kind = decode_header(header)
            if op == STOP:
                return steps
            if op == CAPTURE:
                runner.capture(key)
            elif op == RUN:
                _broadcast_inputs(engine, group, key.phase, key.batch, length)
                runner.run(StepPlan(key, _held(engine, served), length, kind))
                steps += 1


def _held(engine: Engine, served: GraphKey | None) -> GraphKey | None:
    """The leader's graph if this rank holds the same one (else run eagerly at the same
    shape: an all-reduce from a replay matches an eager one)."""
    cache = engine.runner.cache
    if served is None or cache is None or served not in cache:
        return None
    cache.policy.lookup(served)  # keep the LRU order in step with the leader's
    return served
