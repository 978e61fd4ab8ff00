"""Continuous batching: concurrent requests share decode steps, each in its own KV-cache row.

Requests join a running batch at a step boundary and leave it when they finish, stop or
are cancelled. Each boundary does, in order:

1. cancellations: a cancelled request leaves the queue or frees its row;
2. admission (FIFO): while a row is free and the prefill budget allows, the head of the
   queue is prefilled into the *lowest* free row (`Engine.prefill_row`);
3. one decode step over every live row that still owes tokens, in the smallest batch
   bucket holding the highest live row; rows in that bucket that are free, or that have
   been launched for all their tokens, are masked (their positions stay put);
4. read-back: tokens reach each request's callback in order; on CUDA the newest decode
   stays in flight (the GPU runs one step ahead of the host, as `Engine.generate` does).

Policy, and the bounds it gives:

- **Bounded batch**: at most `max_batch` requests hold rows; the rest wait in FIFO order.
- **Prefill interleaving**: at most `prefills_per_step` (default 1) newcomers are
  prefilled between two decode steps, one prompt each. So a running row's gap between
  two tokens grows by at most `prefills_per_step` prefills of at most `max_seq_len - 1`
  prompt tokens each (one prefill bucket each), whatever the queue holds.
- **No starvation**: admission is strictly FIFO, and every boundary advances every live
  row by one token, so a live request ends within its `max_new_tokens` boundaries and
  frees its row; the queue's head gets the next free row, and a request with k requests
  ahead of it is admitted within k row releases.

Why the rows are safe to share: a row is freed only when its request is done, and only
a free row is handed out; a prefill never reads the cache, and a decode step reads only
positions at or below its own row's newest token, each written by this request (by its
prefill or by an earlier step) before it is read. What a finished request left in its
row is therefore never read by the next one, and writes that a masked row makes land in
that row alone. Sampling draws depend on (seed, position) only, so a request gets the
same tokens alone or in any batch.

The scheduler is driven by one thread (the engine is not thread-safe); `submit` and
`cancel` may be called from any thread.
"""

from __future__ import annotations

import heapq
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from hybridgraph.engine import Engine
from hybridgraph.request import GenerationResult, SamplingParams, check_stop_ids
from hybridgraph.runtime.dynamic import choose_bucket
from hybridgraph.runtime.step import TokenReader
from hybridgraph.text import TextStream, validate_stop

# on_token(token) -> False cancels the request (the token is kept, as in Engine.generate).
RowTokenCallback = Callable[[int], bool | None]
# on_text(token, its text delta) -> False cancels the request, as on_token.
RowTextCallback = Callable[[int, str], bool | None]
DoneCallback = Callable[["Ticket"], None]


@dataclass(eq=False)
class Ticket:
    """One submitted request as the scheduler tracks it; `result` fills in as it runs."""

    prompt: list[int]
    max_new: int
    sampling: SamplingParams       # seed resolved at submit
    stops: frozenset[int]
    on_token: RowTokenCallback | None
    on_done: DoneCallback | None
    result: GenerationResult
    t_submit: float
    text: TextStream | None = None     # with stop strings or on_text: the row's text
    on_text: RowTextCallback | None = None
    row: int | None = None         # the KV-cache row, while live
    pos: int = 0                   # position of its newest launched token
    launched: int = 0              # tokens whose computation has been launched
    admitted_at: int = -1          # boundary count at admission (for tests and stats)
    done: bool = False
    cancelled: bool = False        # set from any thread; honoured at the next boundary
    error: BaseException | None = None  # what ended it, when finish_reason is "error"
    t_last: float = 0.0

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class _Launch:
    slot: int                      # its launch number (TokenReader.push / read)
    # (row, ticket, position of the row's token this launch produces)
    members: list[tuple[int, Ticket, int]] = field(default_factory=list)
    decode: bool = False


class Scheduler:
    """Continuous batching over one Engine (see the module docstring for the policy)."""

    def __init__(self, engine: Engine, max_batch: int | None = None,
                 prefills_per_step: int = 1) -> None:
        max_batch = engine.max_batch if max_batch is None else max_batch
        if not isinstance(max_batch, int) or not 1 <= max_batch <= engine.max_batch:
            raise ValueError(f"max_batch must be an integer in [1, {engine.max_batch}] (the "
                             f"engine's max_batch), got {max_batch!r}")
        if max_batch > 1 and engine.engine_config.tp != 1:
            # Followers mirror a step's prompt and the parameters of rows [:b] only, not
            # the row a newcomer goes to nor the decode mask (parallel/control.py).
            raise ValueError(f"max_batch {max_batch} with tp {engine.engine_config.tp}: "
                             f"continuous batching runs on one rank only; use max_batch 1")
        if not isinstance(prefills_per_step, int) or not 1 <= prefills_per_step <= 4:
            raise ValueError(f"prefills_per_step must be an integer in [1, 4], "
                             f"got {prefills_per_step!r}")
        self.engine, self.max_batch, self.prefills_per_step = engine, max_batch, prefills_per_step
        self.buckets = [b for b in engine.batch_buckets if b < max_batch]
        self.buckets.append(choose_bucket(max_batch, engine.batch_buckets))
        self.free: list[int] = list(range(max_batch))       # a heap: lowest row first
        self.live: dict[int, Ticket] = {}                   # row -> its request
        self.waiting: deque[Ticket] = deque()
        self.lock = threading.Lock()                        # guards `waiting`
        self.inflight: deque[_Launch] = deque()
        # One step ahead only where launches are asynchronous (see Engine._generate).
        self.pipelined = engine.device.type == "cuda"
        # In flight at once: the previous decode, this boundary's prefills, this decode.
        self.reader = TokenReader(engine.bufs, slots=prefills_per_step + 2)
        self.launches = 0
        self.boundaries = 0
        self.steps_by_bucket: dict[int, int] = {}

    # ------------------------------------------------------------------ any thread

    def submit(self, prompt_ids: Sequence[int], max_new_tokens: int = 32,
               sampling: SamplingParams | None = None, stop_ids: Sequence[int] | None = None,
               on_token: RowTokenCallback | None = None,
               on_done: DoneCallback | None = None, *, stop: Sequence[str] | None = None,
               ignore_eos: bool = False, on_text: RowTextCallback | None = None) -> Ticket:
        """Queue a request (validated now: a bad one raises RequestError naming the field).

        Stop rules as Engine.generate's: stop_ids (default: the model's end ids, none with
        ignore_eos), and stop strings, cut from the text; with stop strings or on_text
        the result carries `text` and on_text gets each token's text delta."""
        self.engine.validate(prompt_ids, max_new_tokens)
        sampling = SamplingParams.of(sampling)
        if sampling.seed is None:
            sampling = SamplingParams(sampling.temperature, sampling.top_k, sampling.top_p,
                                      random.getrandbits(62))
        stop_ids = check_stop_ids(stop_ids)
        stop_strings = validate_stop(stop)
        stops = frozenset(stop_ids or ()) if ignore_eos or stop_ids is not None else \
            frozenset(self.engine.tokenizer.eos_ids)
        ticket = Ticket(list(prompt_ids), max_new_tokens, sampling, stops, on_token, on_done,
                        GenerationResult([], len(prompt_ids), float("nan")), time.perf_counter(),
                        TextStream(self.engine.tokenizer, stop_strings)
                        if stop_strings or on_text is not None else None, on_text)
        with self.lock:
            self.waiting.append(ticket)
        return ticket

    @property
    def idle(self) -> bool:
        return not self.live and not self.waiting and not self.inflight

    def queued(self) -> int:
        return len(self.waiting)

    def stats(self) -> dict[str, Any]:
        """For a server's status (read from another thread: copies, no locks needed)."""
        return {"max_batch": self.max_batch, "live": len(self.live), "queued": len(self.waiting),
                "prefills_per_step": self.prefills_per_step, "boundaries": self.boundaries,
                "steps_by_bucket": {str(b): n for b, n in dict(self.steps_by_bucket).items()}}

    # ----------------------------------------------------------- the driving thread

    def run_until_idle(self) -> None:
        while not self.idle:
            self.step()

    def step(self) -> None:
        """One boundary: cancellations, admissions, one decode step, read-back.

        If the engine raises, every live request ends with finish_reason "error" (its
        `error` set, its on_done called) before the exception propagates; queued ones
        stay queued.
        """
        try:
            with torch.inference_mode():
                self._sweep_cancelled()
                for _ in range(self.prefills_per_step):
                    if not self.free or not self._admit():
                        break
                launched = self._launch_decode()
                # Keep only the decode just launched in flight (the host reads the previous
                # one meanwhile). With nothing launched this boundary, read everything: a
                # row whose last token is in flight must get it, or it would wait forever.
                keep = 1 if self.pipelined and launched else 0
                while len(self.inflight) > keep:
                    self._deliver(self.inflight.popleft())
        except Exception as e:
            self.inflight.clear()
            for t in list(self.live.values()):
                t.error = e
                self._finish(t, "error")
            raise
        finally:
            self.boundaries += 1

    def _sweep_cancelled(self) -> None:
        with self.lock:
            gone = [t for t in self.waiting if t.cancelled]
            for t in gone:
                self.waiting.remove(t)
        for t in gone:
            self._finish(t, "cancelled")
        for t in [t for t in self.live.values() if t.cancelled]:
            self._finish(t, "cancelled")

    def _admit(self) -> bool:
        with self.lock:
            if not self.waiting:
                return False
            ticket = self.waiting.popleft()
        row = heapq.heappop(self.free)
        ticket.row, ticket.admitted_at = row, self.boundaries
        self.live[row] = ticket
        ticket.pos = self.engine.prefill_row(row, ticket.prompt, ticket.sampling)
        ticket.launched = 1
        self._push(decode=False).members.append((row, ticket, ticket.pos))
        return True

    def _launch_decode(self) -> bool:
        """Launch one decode step over the rows that still owe tokens; False if none do."""
        # A row whose last token is launched waits masked.
        rows = [r for r, t in self.live.items() if t.launched < t.max_new]
        if not rows:
            return False
        b = choose_bucket(max(self.live) + 1, self.buckets)
        active = [0] * self.engine.max_batch
        for r in rows:
            active[r] = 1
        tickets = [self.live[r] for r in rows]
        kind = "greedy" if all(t.sampling.temperature == 0 for t in tickets) else "sample"
        self.engine.decode_rows(b, active, max(t.pos for t in tickets), kind)
        launch = self._push(decode=True)
        for r, t in zip(rows, tickets, strict=True):
            t.pos += 1
            t.launched += 1
            launch.members.append((r, t, t.pos))
        self.steps_by_bucket[b] = self.steps_by_bucket.get(b, 0) + 1
        return True

    def _push(self, decode: bool) -> _Launch:
        launch = _Launch(self.launches, decode=decode)
        self.reader.push(self.launches)
        self.launches += 1
        self.inflight.append(launch)
        return launch

    def _deliver(self, launch: _Launch) -> None:
        tokens = self.reader.read(launch.slot, [r for r, _, _ in launch.members],
                                  [p for _, _, p in launch.members])
        now = time.perf_counter()
        for (_, t, _), token in zip(launch.members, tokens, strict=True):
            if t.done:  # finished while this step was in flight: its token is void
                continue
            res = t.result
            res.tokens.append(token)
            if len(res.tokens) == 1:
                res.ttft_ms = (now - t.t_submit) * 1e3
            else:
                res.token_ms.append((now - t.t_last) * 1e3)
            t.t_last = now
            try:
                done, delta = token in t.stops, ""
                if t.text is not None:  # text deltas and stop strings
                    delta, hit = t.text.step(token, final=done or len(res.tokens) >= t.max_new)
                    done = done or hit
                    res.text = t.text.text
                keep = t.on_token(token) if t.on_token is not None else True
                if t.on_text is not None and t.on_text(token, delta) is False:
                    keep = False
            except Exception as e:  # one client's callback must not end the others' work
                t.error = e
                self._finish(t, "error")
                continue
            if keep is False or t.cancelled:
                self._finish(t, "cancelled")
            elif done:
                self._finish(t, "stop")
            elif len(res.tokens) >= t.max_new:
                self._finish(t, "length")

    def _finish(self, t: Ticket, reason: str) -> None:
        t.done = True
        t.result.finish_reason = reason
        if t.admitted_at >= 0:  # it ran: counted as Engine.generate counts its requests
            self.engine.requests_served += 1
        if t.row is not None:
            del self.live[t.row]
            heapq.heappush(self.free, t.row)
            t.row = None
        if t.on_done is not None:
            t.on_done(t)
