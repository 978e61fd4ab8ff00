"""One client connection: who it is (its peer process), the jobs it has in flight, frames
read under deadlines, and writes that never buffer without bound for a client that stopped
reading."""

from __future__ import annotations

import asyncio
import select
import socket
import struct
import time
from collections.abc import Hashable
from typing import Any

from hybridgraph.server.limits import EventLog, Limits
from hybridgraph.server.protocol import (
    IDLE,
    TIMEOUT,
    TRUNCATED,
    CaptureRequest,
    GenerateRequest,
    ProtocolError,
    RequestId,
    encode_frame,
    error_reply,
    frame_length,
)

HANGUP_POLL_S = 0.05  # how often a half-closed connection checks its peer is still there

_UCRED = struct.Struct("3i")  # pid, uid, gid


def peer_of(writer: asyncio.StreamWriter) -> Hashable:
    """The client's process id (SO_PEERCRED), so fairness and quotas are per process however
    many connections it opens; the connection itself where the platform can't say."""
    sock = writer.get_extra_info("socket")
    try:
        pid, _, _ = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                  _UCRED.size))
        return ("pid", pid)
    except (AttributeError, OSError):
        return ("conn", id(writer))


def peer_hung_up(writer: asyncio.StreamWriter) -> bool:
    """True when the peer closed its socket entirely (or it broke), False after a mere
    half-close (`shutdown(SHUT_WR)`): only then does the client still read replies."""
    sock = writer.get_extra_info("socket")
    if sock is None or writer.is_closing():
        return True
    try:
        p = select.poll()
        p.register(sock.fileno(), 0)  # POLLHUP and POLLERR are always reported
        return any(ev & (select.POLLHUP | select.POLLERR) for _, ev in p.poll(0))
    except (OSError, ValueError):
        return True


class Connection:
    """Reads frames under the limits' deadlines, and writes replies that never buffer
    without bound for a client that stopped reading."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 peer: Hashable, limits: Limits, events: EventLog) -> None:
        self.reader, self.writer, self.peer = reader, writer, peer
        self.limits, self.events = limits, events
        self.jobs: dict[RequestId, Job] = {}
        self.open = True
        self.refused = 0                       # invalid frames so far
        self.last_active = time.monotonic()    # a frame in, or a job finished
        self.frame_since: float | None = None  # a frame's first byte came in then
        self.drain_since: float | None = None  # waiting for the client to read since then

    def send(self, msg: dict[str, Any]) -> None:
        """Queue a reply. The server awaits `drain()` after each frame it handles, so a
        client that doesn't read stops being read; replies the worker produces meanwhile
        are bounded by max_unread_bytes, past which the client is dropped."""
        if not self.open:
            return
        if self.writer.is_closing():  # the write side failed or the peer is gone
            self.drop()
            return
        self.writer.write(encode_frame(msg))
        unread = self.writer.transport.get_write_buffer_size()
        if unread > self.limits.max_unread_bytes:
            self.events.event("unread_dropped", f"dropping clients with over "
                                                f"{self.limits.max_unread_bytes} unread reply bytes")
            self.drop()
            self.writer.transport.abort()

    def drop(self) -> int:
        """The peer is gone: cancel its work. Returns how many jobs were cancelled."""
        self.open = False
        for job in self.jobs.values():
            job.cancelled = True
        return len(self.jobs)

    async def read_frame(self) -> bytes | None:
        """One frame's body; None on EOF between frames. No timer per frame (they cost the
        IPC path tens of microseconds): `check_deadlines`, run periodically, closes a
        connection idle too long or stuck mid-frame, which ends this read."""
        try:
            first = await self.reader.readexactly(1)
        except asyncio.IncompleteReadError:
            return None
        self.frame_since = time.monotonic()
        try:
            try:
                header = first + await self.reader.readexactly(3)
            except asyncio.IncompleteReadError as e:
                raise ProtocolError(TRUNCATED, f"frame header truncated after "
                                               f"{1 + len(e.partial)} of 4 bytes",
                                    fatal=True) from None
            n = frame_length(header, self.limits.max_frame_bytes)
            try:
                return await self.reader.readexactly(n)
            except asyncio.IncompleteReadError as e:
                raise ProtocolError(TRUNCATED, f"frame body truncated: got "
                                               f"{len(e.partial)} of {n} bytes",
                                    fatal=True) from None
        finally:
            self.frame_since = None
            self.last_active = time.monotonic()

    async def drain(self) -> None:
        """Wait until the client has read enough of its replies (see send)."""
        self.drain_since = time.monotonic()
        try:
            await self.writer.drain()
        finally:
            self.drain_since = None

    def check_deadlines(self, now: float) -> None:
        """Close this connection if it broke a deadline: a frame not complete within
        frame_timeout_s of its first byte, no frame for idle_timeout_s with no work in
        flight, or replies unread for idle_timeout_s. The error frame goes out first."""
        lim = self.limits
        if not self.open:
            return
        if self.frame_since is not None and now - self.frame_since > lim.frame_timeout_s:
            self.events.event("frame_timeouts", "closing connections whose frame took longer "
                                                f"than {lim.frame_timeout_s:g} s")
            self._close_with(TIMEOUT, f"frame not complete {lim.frame_timeout_s:g} s after "
                                      f"its first byte; closing")
        elif self.drain_since is not None and now - self.drain_since > lim.idle_timeout_s:
            self.events.event("unread_closed", "dropping clients that stopped reading")
            self.drop()
            self.writer.transport.abort()  # it reads nothing: no point in a last frame
        elif (self.frame_since is None and self.drain_since is None and not self.jobs
              and now - self.last_active > lim.idle_timeout_s):
            self.events.event("idle_closed", f"closing connections idle for "
                                             f"{lim.idle_timeout_s:g} s")
            self._close_with(IDLE, f"no request for {lim.idle_timeout_s:g} s and none in "
                                   f"flight; closing")

    def _close_with(self, code: str, message: str) -> None:
        self.send(error_reply(None, code, message))
        self.drop()
        self.writer.close()  # flushes the error first; the pending read then sees EOF

    async def finish_after_eof(self) -> None:
        """The client sent its last frame. After `shutdown(SHUT_WR)` it still reads: finish
        its jobs. If it closed or reset the socket, nobody reads: cancel them."""
        while self.jobs and self.open:
            if peer_hung_up(self.writer):
                return
            await asyncio.sleep(HANGUP_POLL_S)
        await self.drain()


class Job:
    __slots__ = ("req", "conn", "prompt_ids", "t_recv", "t_start", "t_first", "n_tokens",
                 "cancelled")

    def __init__(self, req: GenerateRequest | CaptureRequest, conn: Connection,
                 prompt_ids: list[int] | None, t_recv: float) -> None:
        self.req, self.conn, self.prompt_ids = req, conn, prompt_ids
        self.t_recv, self.t_start, self.t_first = t_recv, 0.0, 0.0
        self.n_tokens = 0
        self.cancelled = False  # set on the loop, read by the worker's token callback
