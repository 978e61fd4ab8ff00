"""Every bound the server puts on its clients, in one place, and the once-with-a-count log
for the events those bounds cause (a flood of refused clients must not flood the log)."""

from __future__ import annotations

import argparse
import logging
import resource
import time
from dataclasses import dataclass, fields

from hybridgraph.server.protocol import DEFAULT_MAX_FRAME_BYTES

log = logging.getLogger("hybridgraph.server")

MAX_FRAME_BYTES_CAP = 2**32 - 1   # what the 4-byte header can announce
MIN_FRAME_BYTES = 64              # room for the smallest generate request


def _default_max_connections() -> int:
    # Stay clear of the file-descriptor limit: at it, accept() fails for everyone.
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1024
    return max(8, min(1024, soft - 64))


@dataclass
class Limits:
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    max_connections: int = 0          # 0: derived from the fd limit, see resolved()
    frame_timeout_s: float = 10.0     # a frame's first byte to its last
    idle_timeout_s: float = 300.0     # a connection with no request and no work
    drain_s: float = 10.0             # on shutdown, in-flight requests get this long
    max_jobs_per_connection: int = 64
    max_jobs_per_peer: int = 128      # a peer is a process (SO_PEERCRED), however many sockets
    max_queued_jobs: int = 1024
    max_unread_bytes: int = 8 << 20   # replies buffered for a client that stopped reading
    max_refused_frames: int = 64      # invalid frames before the connection is closed
    text_chars_per_token: int = 32    # a text prompt over max_seq_len * this can't fit
    allow_admin: bool = False         # capture and shutdown requests

    def __post_init__(self) -> None:
        if not MIN_FRAME_BYTES <= self.max_frame_bytes <= MAX_FRAME_BYTES_CAP:
            raise ValueError(f"max_frame_bytes must be in [{MIN_FRAME_BYTES}, "
                             f"{MAX_FRAME_BYTES_CAP}], got {self.max_frame_bytes}")
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name != "allow_admin" and (not isinstance(v, int | float) or v < 0):
                raise ValueError(f"{f.name} must be a number >= 0, got {v!r}")
        for name in ("frame_timeout_s", "idle_timeout_s", "max_jobs_per_connection",
                     "max_jobs_per_peer", "max_queued_jobs", "max_refused_frames"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.max_connections == 0:
            self.max_connections = _default_max_connections()

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Limits:
        """The `serve` flags of the same names (those not given keep the defaults)."""
        given = {f.name: getattr(args, f.name) for f in fields(cls)
                 if getattr(args, f.name, None) is not None}
        try:
            return cls(**given)
        except ValueError as e:  # named as the user spelt it
            name = str(e).split()[0]
            raise ValueError("--" + name.replace("_", "-") + str(e)[len(name):]) from None

    def max_text_chars(self, max_seq_len: int) -> int:
        return max_seq_len * self.text_chars_per_token


def add_serve_args(p: argparse.ArgumentParser) -> None:
    """The `hybridgraph serve` flags for these limits."""
    d = Limits.__dataclass_fields__
    p.add_argument("--max-frame-bytes", type=int, default=d["max_frame_bytes"].default,
                   help=f"refuse request frames larger than this, before reading them "
                        f"([{MIN_FRAME_BYTES}, 2^32))")
    p.add_argument("--max-connections", type=int, default=None,
                   help="refuse connections beyond this many (default: from the fd limit)")
    p.add_argument("--frame-timeout-s", type=float, default=None,
                   help="close a connection whose frame takes longer than this from its first "
                        "byte to its last (default 10)")
    p.add_argument("--idle-timeout-s", type=float, default=None,
                   help="close a connection with no request in flight after this long "
                        "without a frame (default 300)")
    p.add_argument("--max-jobs-per-peer", type=int, default=None,
                   help="requests one client process may have queued or running (default 128)")
    p.add_argument("--drain-s", type=float, default=d["drain_s"].default,
                   help="on SIGTERM or shutdown, let in-flight requests finish for this "
                        "long, then cancel them")
    p.add_argument("--allow-admin", action="store_true",
                   help="accept capture and shutdown requests (off: any local client could "
                        "stop the server or fill GPU memory with graphs)")


class EventLog:
    """Logs an event's first occurrence, then at most one line per `every_s` with the count
    since; totals stay readable (the server's status reports them)."""

    def __init__(self, every_s: float = 10.0) -> None:
        self.every_s = every_s
        self.totals: dict[str, int] = {}
        self._pending: dict[str, int] = {}
        self._last: dict[str, float] = {}

    def event(self, kind: str, message: str, exc: BaseException | None = None) -> None:
        self.totals[kind] = self.totals.get(kind, 0) + 1
        self._pending[kind] = self._pending.get(kind, 0) + 1
        now = time.monotonic()
        if now - self._last.get(kind, -1e18) >= self.every_s:
            n = self._pending.pop(kind)
            more = f" (x{n} since the last report)" if n > 1 else ""
            log.warning("%s%s; %d in all", message, more, self.totals[kind],
                        exc_info=exc if self.totals[kind] == 1 else None)
            self._last[kind] = now

