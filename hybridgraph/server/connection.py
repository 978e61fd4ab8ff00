"""One client connection and the jobs it has in flight, with the limits that keep one
client from holding the GPU's queue or the server's memory hostage."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from hybridgraph.server.protocol import CaptureRequest, GenerateRequest, RequestId, encode_frame

log = logging.getLogger("hybridgraph.server")

# One connection may not hold the GPU's queue hostage, nor the server's memory.
MAX_JOBS_PER_CONNECTION = 64
MAX_QUEUED_JOBS = 1024
MAX_UNREAD_BYTES = 8 << 20    # replies buffered for a client that stopped reading


class Connection:
    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.jobs: dict[RequestId, Job] = {}
        self.open = True

    def send(self, msg: dict[str, Any]) -> None:
        if not self.open or self.writer.is_closing():
            return
        self.writer.write(encode_frame(msg))
        if self.writer.transport.get_write_buffer_size() > MAX_UNREAD_BYTES:
            # The client reads nothing: drop it (cancelling its work) before its replies
            # grow without bound. Other clients never wait on this one.
            log.warning("dropping a client with %d unread reply bytes",
                        self.writer.transport.get_write_buffer_size())
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
