"""One client connection: who it is (its peer process), the jobs it has in flight, and the
writes to it, which never buffer without bound for a client that stopped reading."""

from __future__ import annotations

import asyncio
import logging
import select
import socket
import struct
import time
from collections.abc import Hashable
from typing import Any

from hybridgraph.server.protocol import CaptureRequest, GenerateRequest, RequestId, encode_frame

log = logging.getLogger("hybridgraph.server")

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
    def __init__(self, writer: asyncio.StreamWriter, peer: Hashable,
                 max_unread_bytes: int) -> None:
        self.writer, self.peer = writer, peer
        self.max_unread_bytes = max_unread_bytes
        self.jobs: dict[RequestId, Job] = {}
        self.open = True
        self.refused = 0                       # invalid frames so far
        self.last_active = time.monotonic()    # a frame in, or a job finished

    def send(self, msg: dict[str, Any]) -> None:
        """Queue a reply. The connection's reader awaits `writer.drain()` after each frame it
        handles, so a client that doesn't read stops being read; replies the worker produces
        meanwhile are bounded by max_unread_bytes, past which the client is dropped."""
        if not self.open:
            return
        if self.writer.is_closing():  # the write side failed or the peer is gone
            self.drop()
            return
        self.writer.write(encode_frame(msg))
        unread = self.writer.transport.get_write_buffer_size()
        if unread > self.max_unread_bytes:
            log.warning("dropping a client with %d unread reply bytes", unread)
            self.drop()
            self.writer.transport.abort()

    def drop(self) -> int:
        """The peer is gone: cancel its work. Returns how many jobs were cancelled."""
        self.open = False
        for job in self.jobs.values():
            job.cancelled = True
        return len(self.jobs)


class Job:
    __slots__ = ("req", "conn", "prompt_ids", "t_recv", "t_start", "t_first", "n_tokens",
                 "cancelled")

    def __init__(self, req: GenerateRequest | CaptureRequest, conn: Connection,
                 prompt_ids: list[int] | None, t_recv: float) -> None:
        self.req, self.conn, self.prompt_ids = req, conn, prompt_ids
        self.t_recv, self.t_start, self.t_first = t_recv, 0.0, 0.0
        self.n_tokens = 0
        self.cancelled = False  # set on the loop, read by the worker's token callback
