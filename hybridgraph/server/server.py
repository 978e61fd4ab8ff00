"""asyncio Unix-socket server: one process owns the engine, many clients talk to it.

Two threads (plus one that tokenizes text prompts). The asyncio loop owns every socket: it
reads and validates frames, answers `status` and `cancel` at once, and writes replies. The
worker thread (worker.py) makes every engine call, taking jobs round-robin across client
processes from a fair queue (scheduler.py).

A hostile local client is bounded everywhere (limits.py): frame size, a frame's deadline
from first byte to last, idle connections, connection count, refused frames, jobs per
connection and per process, unread reply bytes. A client that doesn't read stops being
read. Cancel reaches only the caller's own requests; admin requests need --allow-admin.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from collections.abc import Hashable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from hybridgraph.engine import Engine, RequestError
from hybridgraph.model.chat import chat_prompt_ids
from hybridgraph.server.connection import Connection, Job, peer_of
from hybridgraph.server.fair_queue import FairQueue
from hybridgraph.server.limits import EventLog, Limits
from hybridgraph.server.metrics import Metrics
from hybridgraph.server.protocol import (
    ADMIN_TYPES,
    BAD_TYPE,
    BAD_VALUE,
    BUSY,
    DUPLICATE_ID,
    FORBIDDEN,
    INTERNAL,
    MALFORMED,
    MISSING_FIELD,
    SHUTTING_DOWN,
    TOO_MANY_CONNECTIONS,
    TOO_MANY_ERRORS,
    UNKNOWN_FIELD,
    UNKNOWN_TYPE,
    CancelRequest,
    CaptureRequest,
    GenerateRequest,
    ProtocolError,
    RequestId,
    ShutdownRequest,
    StatusRequest,
    decode_body,
    error_reply,
    parse_request,
)
from hybridgraph.server.sockets import bind_socket
from hybridgraph.server.submit import Front, RequestStream
from hybridgraph.server.worker import Worker, wire_field

log = logging.getLogger("hybridgraph.server")

# Refusals that only a broken or hostile client earns; enough of them close the connection.
STRIKES = {MALFORMED, MISSING_FIELD, UNKNOWN_FIELD, BAD_TYPE, UNKNOWN_TYPE, FORBIDDEN,
           DUPLICATE_ID}


class Server:
    def __init__(self, engine: Engine, socket_path: str | None,
                 limits: Limits | None = None) -> None:
        self.engine, self.path = engine, socket_path  # no path: other fronts only
        self.limits = limits or Limits()
        self.jobs: FairQueue[Job] = FairQueue()
        self.peer_jobs: dict[Hashable, int] = {}
        self.conns: set[Connection] = set()
        self.streams: set[RequestStream] = set()  # requests other fronts submitted
        self.fronts: list[Front] = []  # e.g. HTTP: started before ready, stopped after drain
        self.metrics = Metrics()
        self.metrics.watch(self.jobs.qsize, self._in_flight,
                           lambda: self.engine.stats().get("graphs"))
        self.stopping = False
        self.t_start = time.time()
        self.counts = {"requests_cancelled": 0, "requests_failed": 0, "frames_refused": 0,
                       "disconnects": 0}
        self.events = EventLog()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.worker: Worker | None = None
        self.tokenize_pool = ThreadPoolExecutor(1, thread_name_prefix="hybridgraph-tokenize")
        self.done: asyncio.Event | None = None
        self.ready = threading.Event()
        self.listener: asyncio.AbstractServer | None = None
        self.inode: tuple[int, int] | None = None

    # --------------------------------------------------------------------- lifecycle

    async def run(self) -> int:
        self.loop, self.done = asyncio.get_running_loop(), asyncio.Event()
        self.loop.set_exception_handler(self._loop_error)
        if self.path is not None:
            sock = bind_socket(self.path)
            st = os.stat(self.path)
            self.inode = (st.st_dev, st.st_ino)
            self.listener = await asyncio.start_unix_server(self._serve_conn, sock=sock)
        for front in self.fronts:
            await front.start()
        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.loop.add_signal_handler(sig, self.begin_shutdown, sig.name)
        except (RuntimeError, ValueError):  # not the main thread (an in-process test server)
            pass
        sweeper = self.loop.create_task(self._check_deadlines())
        self.worker = Worker(self.engine, self.jobs, self.loop, self._finish, self._send_token,
                             observe=lambda res: self.metrics.tokens(res.token_ms))
        threading.Thread(target=self.worker.run, name="hybridgraph-engine", daemon=True).start()
        stats = self.engine.stats()
        where = ([self.path] if self.path is not None else []) + [f.where for f in self.fronts]
        log.info("ready: serving %s (mode %s on %s, %d graphs) on %s", stats["model"],
                 stats["mode"], stats["device"], stats.get("graphs", {}).get("held", 0),
                 " and ".join(where))
        self.ready.set()
        await self.done.wait()
        sweeper.cancel()
        self.tokenize_pool.shutdown(wait=False, cancel_futures=True)
        log.info("stopped" + (f"; removed {self.path}" if self.path is not None else ""))
        return 0

    def _loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        # asyncio reports e.g. every failed accept() at the fd limit with a traceback:
        # the first with its traceback, then counts.
        e = context.get("exception")
        self.events.event(f"loop: {context.get('message')}: {type(e).__name__}",
                          f"event loop: {context.get('message')} ({e!r})", exc=e)

    async def _check_deadlines(self) -> None:
        """One timer for every connection's deadlines, rather than timers per frame."""
        lim = self.limits
        period = min(1.0, max(0.02, min(lim.frame_timeout_s, lim.idle_timeout_s) / 4))
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for conn in list(self.conns):
                conn.check_deadlines(now)

    def begin_shutdown(self, why: str) -> None:
        if self.stopping:
            return
        self.stopping = True
        log.info("shutting down (%s): no new connections; draining %d in-flight requests",
                 why, self._in_flight())
        assert self.loop is not None
        self.loop.create_task(self._shutdown())

    async def _shutdown(self) -> None:
        assert self.loop is not None and self.done is not None
        if self.listener is not None:
            self.listener.close()
            self._unlink()  # a new server may bind the path while this one drains
        deadline = self.loop.time() + self.limits.drain_s
        while self._in_flight() and self.loop.time() < deadline:
            await asyncio.sleep(0.01)
        for conn in self.conns:
            for job in conn.jobs.values():
                job.cancelled = True
        for stream in self.streams:
            stream.cancel()
        # Cancelled jobs end at their next token; queued ones are skipped by the worker.
        deadline = self.loop.time() + 30.0
        while self._in_flight() and self.loop.time() < deadline:
            await asyncio.sleep(0.01)
        self.jobs.close()
        for front in self.fronts:
            await front.stop()
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
        if self.path is None:
            return
        try:
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == self.inode:  # never remove another server's socket
                os.unlink(self.path)
        except FileNotFoundError:
            pass

    def _in_flight(self) -> int:
        return sum(len(c.jobs) for c in self.conns) + sum(len(s.jobs) for s in self.streams)

    # ------------------------------------------------------------------- connections

    async def _serve_conn(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        conn = Connection(reader, writer, peer_of(writer), self.limits, self.events)
        n_open = sum(1 for c in self.conns if c.open)
        if n_open >= self.limits.max_connections:
            self.events.event("connections_refused", f"refusing connections: {n_open} open, "
                                                     f"the maximum (--max-connections)")
            conn.send(error_reply(None, TOO_MANY_CONNECTIONS, f"the server holds {n_open} "
                                  f"connections, its maximum; retry later"))
            writer.close()
            return
        self.conns.add(conn)
        try:
            while conn.open:
                try:
                    body = await conn.read_frame()
                    if body is None:  # EOF: a half-close still wants its replies
                        await conn.finish_after_eof()
                        break
                    await self._handle(conn, decode_body(body), time.perf_counter())
                except ProtocolError as e:
                    self._refuse(conn, e)
                    if e.fatal or not conn.open:
                        break
                # Read this client's next frame only once its replies are out: a client
                # that sends without reading slows only itself, errors included.
                await conn.drain()
        except (ConnectionError, OSError):
            pass  # a reset or a failed write: its jobs are cancelled below
        finally:
            if conn.jobs:
                self.counts["disconnects"] += 1
            conn.drop()
            if not conn.jobs:
                self.conns.discard(conn)
            writer.close()

    def _refuse(self, conn: Connection, e: ProtocolError) -> None:
        self.counts["frames_refused"] += 1
        self.metrics.refused("socket")
        conn.send(e.reply())
        if e.code in STRIKES:
            conn.refused += 1
            if conn.refused >= self.limits.max_refused_frames and conn.open:
                self.events.event("too_many_errors", "closing connections that keep sending "
                                                     "refused frames")
                conn.send(error_reply(None, TOO_MANY_ERRORS, f"{conn.refused} refused frames "
                                      f"on this connection; closing"))
                conn.open = False  # the reader stops; its jobs are cancelled

    async def _handle(self, conn: Connection, msg: dict[str, Any], t_recv: float) -> None:
        try:
            await self._dispatch(conn, msg, t_recv)
        except ProtocolError:
            raise
        except Exception as e:  # a bug here must not cost this or other clients
            log.exception("request failed on the loop")
            rid = msg.get("request_id")
            conn.send(error_reply(rid if isinstance(rid, int | str) else None, INTERNAL,
                                  f"{type(e).__name__}: {e}"))

    async def _dispatch(self, conn: Connection, msg: dict[str, Any], t_recv: float) -> None:
        req = parse_request(msg)
        rid = req.request_id
        if msg["type"] in ADMIN_TYPES and not self.limits.allow_admin:
            raise ProtocolError(FORBIDDEN, f"{msg['type']} is an admin request; this server "
                                           f"was started without --allow-admin", "type", rid)
        if isinstance(req, StatusRequest):
            conn.send({"type": "status", "request_id": rid, "status": self.status(conn)})
        elif isinstance(req, CancelRequest):
            conn.send({"type": "cancel", "request_id": rid, "target": req.target,
                       "cancelled": self.cancel(conn, req.target)})
        elif isinstance(req, ShutdownRequest):
            conn.send({"type": "shutdown", "request_id": rid})
            self.begin_shutdown("shutdown request")
        else:
            await self._enqueue(req, conn, t_recv)

    async def submit(self, req: GenerateRequest, stream: RequestStream,
                     t_recv: float | None = None) -> Job:
        """Queue a generate request from another front (HTTP), admitted and bounded as a
        socket request is, in the fair queue under stream.peer; ProtocolError if refused.
        Its replies go to stream.send, on the loop."""
        job = await self._enqueue(req, stream, t_recv or time.perf_counter())
        # No await since the job was queued, so this runs before its _finish can (that
        # runs on this loop too).
        self.streams.add(stream)
        return job

    async def _enqueue(self, req: GenerateRequest | CaptureRequest,
                       conn: Connection | RequestStream, t_recv: float) -> Job:
        """Admit `req` within the limits and queue it in conn.peer's turn of the fair
        queue; ProtocolError if refused."""
        rid = req.request_id
        self._check_room(conn, rid)
        prompt = await self._admit(req)
        self._check_room(conn, rid)  # again: the loop ran other clients meanwhile
        job = Job(req, conn, prompt, t_recv)
        conn.jobs[rid] = job
        self.peer_jobs[conn.peer] = self.peer_jobs.get(conn.peer, 0) + 1
        self.jobs.put(conn.peer, job)
        return job

    def _check_room(self, conn: Connection | RequestStream, rid: RequestId) -> None:
        lim = self.limits
        if self.stopping:
            raise ProtocolError(SHUTTING_DOWN, "the server is shutting down", None, rid)
        if rid in conn.jobs:
            # A nil id: echoing `rid` would read as the reply to the request already using it.
            raise ProtocolError(DUPLICATE_ID, f"request_id {rid!r} is already in flight on "
                                              f"this connection", "request_id", None)
        mine, peers = len(conn.jobs), self.peer_jobs.get(conn.peer, 0)
        if mine >= lim.max_jobs_per_connection or peers >= lim.max_jobs_per_peer \
                or self.jobs.qsize() >= lim.max_queued_jobs:
            raise ProtocolError(BUSY, f"too many requests queued ({mine} on this connection, "
                                      f"{peers} from this process, {self.jobs.qsize()} in "
                                      f"all); retry later", None, rid)

    async def _admit(self, req: GenerateRequest | CaptureRequest) -> list[int] | None:
        """Refuse a bad request now, rather than after it waited in the queue."""
        if isinstance(req, CaptureRequest):
            try:
                self.engine.check_capture_lengths(req.lengths)
            except RequestError as e:
                raise ProtocolError(BAD_VALUE, str(e), "lengths", req.request_id) from None
            return None
        try:
            if req.prompt_ids is not None:
                ids = req.prompt_ids
            elif req.messages is not None:  # issue 11: through the model's chat template
                ids = await self.render_chat(req.messages)
            else:
                ids = await self._tokenize(req.text or "")
            self.engine.validate(ids, req.max_new_tokens)
        except RequestError as e:
            raise ProtocolError(BAD_VALUE, str(e), wire_field(req, e.field),
                                req.request_id) from None
        return ids

    async def _tokenize(self, text: str) -> list[int]:
        # Bounded before encoding, and encoded off the loop: a long text must not stall
        # every other client's stream while it is tokenized.
        limit = self.limits.max_text_chars(self.engine.max_seq_len)
        if len(text) > limit:
            raise RequestError("prompt", f"{len(text)} characters cannot fit the KV cache "
                                         f"(max_seq_len {self.engine.max_seq_len}; at most "
                                         f"{limit} characters are tokenized)")
        assert self.loop is not None
        return await self.loop.run_in_executor(self.tokenize_pool, self.engine.tokenizer.encode,
                                               text)

    async def render_chat(self, messages: list[dict[str, str]]) -> list[int]:
        # Bounded (model.chat's limits, checked first inside) and rendered + encoded off the
        # loop, like a text prompt. Public: the HTTP front renders chats with it too.
        limit = self.limits.max_text_chars(self.engine.max_seq_len)
        chars = sum(len(m["content"]) for m in messages)
        if chars > limit:
            raise RequestError("messages", f"{chars} characters cannot fit the KV cache "
                                           f"(max_seq_len {self.engine.max_seq_len})")
        assert self.loop is not None
        return await self.loop.run_in_executor(self.tokenize_pool, chat_prompt_ids,
                                               self.engine.tokenizer, messages)

    def cancel(self, conn: Connection, target: RequestId) -> bool:
        """Cancel `target`, one of this connection's own requests; False if none is."""
        job = conn.jobs.get(target)
        if job is not None:
            job.cancelled = True
        return job is not None

    def status(self, conn: Connection | None = None) -> dict[str, Any]:
        out = self.engine.stats()
        worker = self.worker
        # The caller's own running requests only: others' ids are theirs to know.
        mine = worker.running_ids(conn) if worker is not None and conn is not None else []
        out.update(
            queue_depth=self.jobs.qsize(), in_flight=self._in_flight(),
            busy=worker is not None and worker.busy,
            running=mine[0] if mine else None, running_ids=mine,
            batch=worker.scheduler.stats() if worker is not None else None,
            connections=sum(1 for c in self.conns if c.open),
            uptime_s=round(time.time() - self.t_start, 3), pid=os.getpid(), socket=self.path,
            fronts=[f.where for f in self.fronts],
            max_frame_bytes=self.limits.max_frame_bytes, stopping=self.stopping,
            allow_admin=self.limits.allow_admin, events=dict(self.events.totals),
            **self.counts)
        return out

    # -------------------------------------------------------- loop-side completions

    def _send_token(self, job: Job, token: int, index: int, text: str = "") -> None:
        job.conn.send({"type": "token", "request_id": job.req.request_id, "token": token,
                       "index": index, "text": text})

    def _finish(self, job: Job, msg: dict[str, Any]) -> None:
        conn, rid = job.conn, job.req.request_id
        front = "http" if isinstance(conn, RequestStream) else "socket"
        latency_ms = (time.perf_counter() - job.t_recv) * 1e3
        if msg["type"] == "result":
            msg["latency_ms"] = latency_ms
            if msg["finish_reason"] == "cancelled":
                self.counts["requests_cancelled"] += 1
            self.metrics.finished(front, msg["finish_reason"], msg["ttft_ms"], latency_ms)
        elif msg["type"] == "error":
            self.counts["requests_failed"] += 1
            if isinstance(job.req, GenerateRequest):
                self.metrics.finished(front, None, float("nan"), latency_ms)
        if conn.jobs.get(rid) is job:
            del conn.jobs[rid]  # before send: a front may count its slot free at once
            n = self.peer_jobs.get(conn.peer, 1) - 1
            if n > 0:
                self.peer_jobs[conn.peer] = n
            else:
                self.peer_jobs.pop(conn.peer, None)
        conn.send(msg)
        conn.last_active = time.monotonic()
        if not conn.open and not conn.jobs:
            self.conns.discard(conn)  # type: ignore[arg-type]
            self.streams.discard(conn)  # type: ignore[arg-type]
