"""The one thread that calls the engine (the engine is not thread-safe).

It runs the batching scheduler (hybridgraph/scheduler.py): generate jobs taken from the
fair queue join the running batch at a step boundary, each in its own KV-cache row, and
leave it when they finish, stop or are cancelled. Jobs are taken only while the batch has
room, so the fair queue's order (round-robin across peers) is the admission order. With
`--max-batch 1` this is one request at a time, first come first served.

Tokens and results go back to the loop with `loop.call_soon_threadsafe`, which keeps each
request's frames in order. Cancelling (a `cancel`, a disconnect, shutdown) only sets
`job.cancelled`; the worker passes it to the request's row at the next boundary, which
frees the row for the next job. Captures (a `capture` job, background captures) run only
while no row is live: a capture's warm-ups write to the rows it runs over.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from hybridgraph.engine import Engine, GenerationResult, RequestError
from hybridgraph.scheduler import Scheduler, Ticket
from hybridgraph.server.connection import Job
from hybridgraph.server.fair_queue import FairQueue
from hybridgraph.server.protocol import (
    BAD_VALUE,
    INTERNAL,
    SHUTTING_DOWN,
    CaptureRequest,
    GenerateRequest,
    error_reply,
)

log = logging.getLogger("hybridgraph.server")

IDLE_CAPTURE_BUDGET_S = 0.05  # short, so a request arriving mid-capture waits little


class Worker:
    def __init__(self, engine: Engine, jobs: FairQueue[Job], loop: asyncio.AbstractEventLoop,
                 finish: Callable[[Job, dict[str, Any]], None],
                 send_token: Callable[[Job, int, int, str], None],
                 observe: Callable[[GenerationResult], None] | None = None) -> None:
        self.engine, self.jobs, self.loop = engine, jobs, loop
        self.finish, self.send_token = finish, send_token
        self.observe = observe  # metrics: sees each finished generation, on this thread
        self.scheduler = Scheduler(engine)
        self.running: dict[Job, Ticket] = {}     # jobs holding (or queued for) a row
        self.held: Job | None = None             # a capture waiting for the batch to drain
        self.closed = False

    @property
    def busy(self) -> bool:
        return bool(self.running) or self.held is not None

    def running_ids(self, conn: Any) -> list[Any]:
        """Request ids of `conn`'s jobs in the batch now, oldest first (the loop thread
        asks: a copy of the keys, no lock needed)."""
        return [j.req.request_id for j in list(self.running) if j.conn is conn]

    def run(self) -> None:
        sched = self.scheduler
        while not (self.closed and sched.idle and self.held is None):
            self._take_jobs()
            for job, ticket in list(self.running.items()):
                if job.cancelled:
                    ticket.cancel()
            if not sched.idle:
                try:
                    sched.step()
                except Exception:  # the scheduler ended every live request with "error"
                    log.exception("a batch step failed; its requests got errors")
            elif self.held is not None:
                job, self.held = self.held, None
                self._reply(job, self._capture(job))

    def _take_jobs(self) -> None:
        """Move jobs from the fair queue into the batch while it has room; block only when
        there is nothing else to do."""
        sched, engine = self.scheduler, self.engine
        while not self.closed and self.held is None \
                and len(sched.live) + sched.queued() < sched.max_batch:
            idle = sched.idle
            if idle and engine.capture_mode == "background" and engine.pending \
                    and self.jobs.empty():
                try:
                    engine.run_pending_captures(IDLE_CAPTURE_BUDGET_S)
                except Exception:
                    log.exception("background capture failed; dropping pending captures")
                    engine.pending.clear()
                continue
            job = self.jobs.get(block=idle)
            if job is None:
                self.closed = self.jobs.drained
                return
            job.t_start = time.perf_counter()
            if isinstance(job.req, CaptureRequest):
                if sched.idle:
                    self._reply(job, self._capture(job))
                else:
                    self.held = job  # after the live rows finish; nothing joins meanwhile
                continue
            self._submit(job)

    def _submit(self, job: Job) -> None:
        req = job.req
        assert isinstance(req, GenerateRequest) and job.prompt_ids is not None
        if job.cancelled:
            self._reply(job, self._result(job, [], "cancelled", float("nan")))
            return
        loop, send_token = self.loop, self.send_token

        def on_token(token: int, delta: str = "") -> bool | None:
            if not job.t_first:
                job.t_first = time.perf_counter()
            # Streamed even when cancelled: the result keeps this token, and a stream
            # must match its result.
            if req.stream:
                loop.call_soon_threadsafe(send_token, job, token, job.n_tokens, delta)
            job.n_tokens += 1
            return False if job.cancelled else None

        def on_done(ticket: Ticket) -> None:
            self.running.pop(job, None)
            res = ticket.result
            if res.finish_reason == "error":
                e = ticket.error
                msg = error_reply(req.request_id, INTERNAL, f"{type(e).__name__}: {e}")
            else:
                if self.observe is not None:
                    self.observe(res)
                msg = self._result(job, res.tokens, res.finish_reason, res.ttft_ms, res.text)
            self._reply(job, msg)

        try:
            # A stream gets each token's text delta (whole characters); without one, text
            # is made once at the end, or by the stop-string matcher.
            self.running[job] = self.scheduler.submit(
                job.prompt_ids, req.max_new_tokens, req.sampling, req.stop_ids,
                None if req.stream else on_token, on_done, stop=req.stop,
                ignore_eos=req.ignore_eos, on_text=on_token if req.stream else None)
        except RequestError as e:
            self._reply(job, error_reply(req.request_id, BAD_VALUE, str(e),
                                         wire_field(req, e.field)))

    def _capture(self, job: Job) -> dict[str, Any]:
        req, rid = job.req, job.req.request_id
        assert isinstance(req, CaptureRequest)
        if job.cancelled:
            return error_reply(rid, SHUTTING_DOWN, "cancelled before it ran")
        try:
            return {"type": "captured", "request_id": rid,
                    "graphs": self.engine.capture_ahead(req.lengths)}
        except Exception as e:
            log.exception("capture %r failed", rid)
            return error_reply(rid, INTERNAL, f"{type(e).__name__}: {e}")

    def _reply(self, job: Job, msg: dict[str, Any]) -> None:
        self.loop.call_soon_threadsafe(self.finish, job, msg)

    def _result(self, job: Job, tokens: list[int], finish: str,
                engine_ttft_ms: float, text: str | None = None) -> dict[str, Any]:
        if text is None:
            try:
                text = self.engine.tokenizer.decode(tokens)
            except Exception:  # a tokenizer that can't decode an id shouldn't fail the request
                text = None
        ms = 1e3
        return {"type": "result", "request_id": job.req.request_id, "tokens": tokens,
                "text": text, "prompt_len": len(job.prompt_ids or ()),
                "finish_reason": finish, "engine_ttft_ms": engine_ttft_ms,
                "ttft_ms": (job.t_first - job.t_recv) * ms if job.t_first else float("nan"),
                "queue_ms": (job.t_start - job.t_recv) * ms}


def wire_field(req: GenerateRequest, engine_field: str) -> str:
    # The engine calls the prompt "prompt"; on the wire it is whichever field carried it.
    if engine_field == "prompt":
        return "prompt_ids" if req.prompt_ids is not None else \
            ("messages" if req.messages is not None else "text")
    if engine_field.startswith("messages["):  # messages[3].content: the wire field is messages
        return "messages"
    return engine_field
