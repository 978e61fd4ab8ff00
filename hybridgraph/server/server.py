"""asyncio Unix-socket server: one process owns the engine, many clients talk to it.

Two threads. The asyncio loop owns every socket: it reads and validates frames, answers
`status`, `cancel` and `shutdown` at once, and writes replies. One worker thread makes
every engine call (the engine is not thread-safe), taking generate and capture jobs FIFO
from a queue; it hands tokens and results back with `loop.call_soon_threadsafe`, which
keeps each request's frames in order. Cancelling (a `cancel`, a disconnect, shutdown)
only sets a flag that the worker's token callback reads, so the engine stops at its next
token and the slot is free for the next job.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import queue
import signal
import sys
import threading
import time
from typing import Any

from hybridgraph.engine import Engine, RequestError, SamplingParams
from hybridgraph.server.connection import (
    MAX_JOBS_PER_CONNECTION,
    MAX_QUEUED_JOBS,
    Connection,
    Job,
)
from hybridgraph.server.protocol import (
    BAD_VALUE,
    BUSY,
    DEFAULT_MAX_FRAME_BYTES,
    DUPLICATE_ID,
    HEADER,
    INTERNAL,
    SHUTTING_DOWN,
    TRUNCATED,
    CancelRequest,
    CaptureRequest,
    GenerateRequest,
    ProtocolError,
    RequestId,
    ShutdownRequest,
    StatusRequest,
    decode_body,
    error_reply,
    frame_length,
    parse_request,
)
from hybridgraph.server.sockets import ServeError, bind_socket, check_socket_path

log = logging.getLogger("hybridgraph.server")

IDLE_CAPTURE_BUDGET_S = 0.05  # short, so a request arriving mid-capture waits little


class Server:
    def __init__(self, engine: Engine, socket_path: str,
                 max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
                 drain_s: float = 10.0) -> None:
        self.engine, self.path = engine, socket_path
        self.max_frame_bytes, self.drain_s = max_frame_bytes, drain_s
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.conns: set[Connection] = set()
        self.current: Job | None = None
        self.stopping = False
        self.t_start = time.time()
        self.counts = {"requests_cancelled": 0, "requests_failed": 0, "frames_refused": 0,
                       "disconnects": 0}
        self.loop: asyncio.AbstractEventLoop | None = None
        self.done: asyncio.Event | None = None
        self.listener: asyncio.AbstractServer | None = None
        self.inode: tuple[int, int] | None = None

    # --------------------------------------------------------------------- lifecycle

    async def run(self) -> int:
        self.loop, self.done = asyncio.get_running_loop(), asyncio.Event()
        sock = bind_socket(self.path)
        st = os.stat(self.path)
        self.inode = (st.st_dev, st.st_ino)
        self.listener = await asyncio.start_unix_server(self._serve_conn, sock=sock)
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, self.begin_shutdown, sig.name)
        threading.Thread(target=self._work, name="hybridgraph-engine", daemon=True).start()
        stats = self.engine.stats()
        log.info("ready: serving %s (mode %s on %s, %d graphs) on %s", stats["model"],
                 stats["mode"], stats["device"], stats.get("graphs", {}).get("held", 0),
                 self.path)
        await self.done.wait()
        log.info("stopped; removed %s", self.path)
        return 0

    def begin_shutdown(self, why: str) -> None:
        if self.stopping:
            return
        self.stopping = True
        log.info("shutting down (%s): no new connections; draining %d in-flight requests",
                 why, self._in_flight())
        assert self.loop is not None
        self.loop.create_task(self._shutdown())

    async def _shutdown(self) -> None:
        assert self.listener is not None and self.loop is not None and self.done is not None
        self.listener.close()
        self._unlink()  # a new server may bind the path while this one drains
        deadline = self.loop.time() + self.drain_s
        while self._in_flight() and self.loop.time() < deadline:
            await asyncio.sleep(0.01)
        for conn in self.conns:
            for job in conn.jobs.values():
                job.cancelled = True
        # Cancelled jobs end at their next token; queued ones are skipped by the worker.
        deadline = self.loop.time() + 30.0
        while self._in_flight() and self.loop.time() < deadline:
            await asyncio.sleep(0.01)
        self.jobs.put(None)
        conns = list(self.conns)
        for conn in conns:
            conn.writer.close()  # flushes what is buffered first...
        # ...which takes the loop a few turns: let final replies reach their clients.
        try:
            await asyncio.wait_for(asyncio.gather(*(c.writer.wait_closed() for c in conns),
                                                  return_exceptions=True), timeout=2.0)
        except TimeoutError:
            pass  # a client that reads nothing must not keep the server from exiting
        self.done.set()

    def _unlink(self) -> None:
        try:
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == self.inode:  # never remove another server's socket
                os.unlink(self.path)
        except FileNotFoundError:
            pass

    def _in_flight(self) -> int:
        return sum(len(c.jobs) for c in self.conns)

    # ------------------------------------------------------------------- connections

    async def _serve_conn(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        conn = Connection(writer)
        self.conns.add(conn)
        try:
            while conn.open:
                try:
                    header = await reader.readexactly(HEADER.size)
                except asyncio.IncompleteReadError as e:
                    if e.partial:
                        self._refuse(conn, ProtocolError(TRUNCATED, f"frame header truncated "
                                                         f"after {len(e.partial)} of 4 bytes"))
                    break
                try:
                    n = frame_length(header, self.max_frame_bytes)
                    try:
                        body = await reader.readexactly(n)
                    except asyncio.IncompleteReadError as e:
                        raise ProtocolError(TRUNCATED, f"frame body truncated: got "
                                                       f"{len(e.partial)} of {n} bytes",
                                            fatal=True) from None
                    t_recv = time.perf_counter()
                    msg = decode_body(body)
                    try:
                        self._dispatch(conn, msg, t_recv)
                        # Read this client's next request only once its replies are out:
                        # a client that sends without reading slows only itself.
                        await writer.drain()
                    except ProtocolError:
                        raise
                    except Exception as e:  # a bug here must not cost this or other clients
                        log.exception("request failed on the loop")
                        rid = msg.get("request_id")
                        conn.send(error_reply(rid if isinstance(rid, int | str) else None,
                                              INTERNAL, f"{type(e).__name__}: {e}"))
                except ProtocolError as e:
                    self._refuse(conn, e)
                    if e.fatal:
                        break
        except (ConnectionError, OSError):
            pass
        finally:
            if conn.jobs:
                self.counts["disconnects"] += 1
            conn.drop()
            if not conn.jobs:
                self.conns.discard(conn)
            writer.close()

    def _refuse(self, conn: Connection, e: ProtocolError) -> None:
        self.counts["frames_refused"] += 1
        conn.send(e.reply())

    def _dispatch(self, conn: Connection, msg: dict[str, Any], t_recv: float) -> None:
        req = parse_request(msg)
        rid = req.request_id
        if isinstance(req, StatusRequest):
            conn.send({"type": "status", "request_id": rid, "status": self.status()})
        elif isinstance(req, CancelRequest):
            conn.send({"type": "cancel", "request_id": rid, "target": req.target,
                       "cancelled": self.cancel(conn, req.target)})
        elif isinstance(req, ShutdownRequest):
            conn.send({"type": "shutdown", "request_id": rid})
            self.begin_shutdown("shutdown request")
        else:
            if self.stopping:
                raise ProtocolError(SHUTTING_DOWN, "the server is shutting down", None, rid)
            if rid in conn.jobs:
                raise ProtocolError(DUPLICATE_ID, f"request_id {rid!r} is already in flight on "
                                                  f"this connection", "request_id", rid)
            if len(conn.jobs) >= MAX_JOBS_PER_CONNECTION or self.jobs.qsize() >= MAX_QUEUED_JOBS:
                raise ProtocolError(BUSY, f"too many requests queued ({len(conn.jobs)} on this "
                                          f"connection, {self.jobs.qsize()} in all); retry later",
                                    None, rid)
            prompt = self._admit(req)
            job = Job(req, conn, prompt, t_recv)
            conn.jobs[rid] = job
            self.jobs.put(job)

    def _admit(self, req: GenerateRequest | CaptureRequest) -> list[int] | None:
        """Refuse a bad request now, rather than after it waited in the queue."""
        if isinstance(req, CaptureRequest):
            try:
                self.engine.check_capture_lengths(req.lengths)
            except RequestError as e:
                raise ProtocolError(BAD_VALUE, str(e), "lengths", req.request_id) from None
            return None
        try:
            ids = req.prompt_ids if req.prompt_ids is not None else \
                self.engine.tokenizer.encode(req.text or "")
            self.engine.validate(ids, req.max_new_tokens)
            _sampling(req).validate()
        except RequestError as e:
            raise ProtocolError(BAD_VALUE, str(e), _field(req, e.field), req.request_id) from None
        return ids

    def cancel(self, conn: Connection, target: RequestId) -> bool:
        """Cancel `target`: this connection's request of that id, else any connection's."""
        jobs = [conn.jobs[target]] if target in conn.jobs else \
            [c.jobs[target] for c in self.conns if target in c.jobs]
        for job in jobs:
            job.cancelled = True
        return bool(jobs)

    def status(self) -> dict[str, Any]:
        out = self.engine.stats()
        out.update(
            queue_depth=self.jobs.qsize(), in_flight=self._in_flight(),
            running=self.current.req.request_id if self.current is not None else None,
            connections=sum(1 for c in self.conns if c.open),
            uptime_s=round(time.time() - self.t_start, 3), pid=os.getpid(), socket=self.path,
            max_frame_bytes=self.max_frame_bytes, stopping=self.stopping, **self.counts)
        return out

    # ------------------------------------------------------------------------ worker

    def _work(self) -> None:
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
            assert self.loop is not None
            self.loop.call_soon_threadsafe(self._finish, job, msg)

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
        loop = self.loop
        assert loop is not None

        def on_token(row: int, token: int) -> bool | None:
            if not job.t_first:
                job.t_first = time.perf_counter()
            # Streamed even when cancelled: the engine keeps this token in the result,
            # and a stream must match its result.
            if req.stream:
                loop.call_soon_threadsafe(self._send_token, job, token, job.n_tokens)
            job.n_tokens += 1
            return False if job.cancelled else None

        try:
            res = self.engine.generate(job.prompt_ids, req.max_new_tokens, _sampling(req),
                                       req.stop_ids, on_token)
        except RequestError as e:
            return error_reply(rid, BAD_VALUE, str(e), _field(req, e.field))
        return self._result(job, res.tokens, res.finish_reason, res.ttft_ms)

    def _result(self, job: Job, tokens: list[int], finish: str,
                engine_ttft_ms: float) -> dict[str, Any]:
        try:
            text: str | None = self.engine.tokenizer.decode(tokens)
        except Exception:  # a tokenizer that can't decode an id shouldn't fail the request
            text = None
        ms = 1e3
        return {"type": "result", "request_id": job.req.request_id, "tokens": tokens,
                "text": text, "prompt_len": len(job.prompt_ids or ()),
                "finish_reason": finish, "engine_ttft_ms": engine_ttft_ms,
                "ttft_ms": (job.t_first - job.t_recv) * ms if job.t_first else float("nan"),
                "queue_ms": (job.t_start - job.t_recv) * ms}

    # -------------------------------------------------------- loop-side completions

    def _send_token(self, job: Job, token: int, index: int) -> None:
        job.conn.send({"type": "token", "request_id": job.req.request_id, "token": token,
                       "index": index})

    def _finish(self, job: Job, msg: dict[str, Any]) -> None:
        conn, rid = job.conn, job.req.request_id
        if msg["type"] == "result":
            msg["latency_ms"] = (time.perf_counter() - job.t_recv) * 1e3
            if msg["finish_reason"] == "cancelled":
                self.counts["requests_cancelled"] += 1
        elif msg["type"] == "error":
            self.counts["requests_failed"] += 1
        conn.send(msg)
        if conn.jobs.get(rid) is job:
            del conn.jobs[rid]
        if not conn.open and not conn.jobs:
            self.conns.discard(conn)


def _sampling(req: GenerateRequest) -> SamplingParams:
    return SamplingParams(req.temperature, req.top_k, req.top_p, req.seed)


def _field(req: GenerateRequest, engine_field: str) -> str:
    # The engine calls the prompt "prompt"; on the wire it is whichever field carried it.
    if engine_field == "prompt":
        return "prompt_ids" if req.prompt_ids is not None else "text"
    return engine_field


def serve_main(args: argparse.Namespace) -> int:
    """`hybridgraph serve`: load, capture ahead (with a progress bar), serve until stopped."""
    try:
        check_socket_path(args.socket)
    except ServeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    from hybridgraph.engine_config import EngineConfig

    engine = Engine.load(args.model, config=EngineConfig.from_args(args, progress=True))
    server = Server(engine, args.socket, args.max_frame_bytes,
                    getattr(args, "drain_s", 10.0))
    try:
        return asyncio.run(server.run())
    except ServeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
