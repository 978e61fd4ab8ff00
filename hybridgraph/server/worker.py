"""The one thread that calls the engine (the engine is not thread-safe).

It takes generate and capture jobs from the fair queue, runs them, and hands tokens and
results back to the loop with `loop.call_soon_threadsafe`, which keeps each request's
frames in order. Cancelling only sets `job.cancelled`, which the token callback reads, so
the engine stops at its next token and the slot is free for the next job.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from hybridgraph.engine import Engine, GenerationResult, RequestError
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
                 send_token: Callable[[Job, int, int], None],
                 observe: Callable[[GenerationResult], None] | None = None) -> None:
        self.engine, self.jobs, self.loop = engine, jobs, loop
        self.finish, self.send_token = finish, send_token
        self.observe = observe  # metrics: sees each finished generation, on this thread
        self.current: Job | None = None

    def run(self) -> None:
        engine = self.engine
        while True:
            if engine.capture_mode == "background" and engine.pending and self.jobs.empty():
                try:
                    engine.run_pending_captures(IDLE_CAPTURE_BUDGET_S)
                except Exception:
                    log.exception("background capture failed; dropping pending captures")
                    engine.pending.clear()
                continue
            job = self.jobs.get()
            if job is None:
                return
            self.current = job
            try:
                msg = self._run(job)
            except Exception as e:
                log.exception("request %r failed", job.req.request_id)
                msg = error_reply(job.req.request_id, INTERNAL, f"{type(e).__name__}: {e}")
            finally:
                self.current = None
            self.loop.call_soon_threadsafe(self.finish, job, msg)

    def _run(self, job: Job) -> dict[str, Any]:
        req, rid = job.req, job.req.request_id
        job.t_start = time.perf_counter()
        if isinstance(req, CaptureRequest):
            if job.cancelled:
                return error_reply(rid, SHUTTING_DOWN, "cancelled before it ran")
            return {"type": "captured", "request_id": rid,
                    "graphs": self.engine.capture_ahead(req.lengths)}
        assert job.prompt_ids is not None
        if job.cancelled:
            return self._result(job, [], "cancelled", float("nan"))
        loop, send_token = self.loop, self.send_token

        def on_token(row: int, token: int, delta: str = "") -> bool | None:
            if not job.t_first:
                job.t_first = time.perf_counter()
            # Streamed even when cancelled: the engine keeps this token in the result,
            # and a stream must match its result.
            if req.stream:
                loop.call_soon_threadsafe(send_token, job, token, job.n_tokens, delta)
            job.n_tokens += 1
            return False if job.cancelled else None

        try:
            # issue 11: a stream gets each token's text delta (whole characters); without
            # one, text is made once at the end, or by the stop-string matcher.
            res = self.engine.generate(job.prompt_ids, req.max_new_tokens, req.sampling,
                                       req.stop_ids, None if req.stream else on_token,
                                       stop=req.stop, ignore_eos=req.ignore_eos,
                                       on_text=on_token if req.stream else None)
        except RequestError as e:
            return error_reply(rid, BAD_VALUE, str(e), wire_field(req, e.field))
        if self.observe is not None:
            self.observe(res)
        return self._result(job, res.tokens, res.finish_reason, res.ttft_ms, res.text)

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
