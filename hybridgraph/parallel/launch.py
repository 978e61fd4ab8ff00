"""Start N rank processes on this host and watch them: one dies, all stop, with an error.

Each rank is `python <argv>` with torchrun's variables set (RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) and NVLink multicast off (group.SAFE_ENV),
so the same command runs under torchrun unchanged. The launcher is the watchdog: a rank
that exits with an error or a signal gets the others terminated (then killed after a
grace period) and a `RankFailed` naming it, instead of peers waiting on it until their
collective timeouts. SIGINT/SIGTERM are passed to rank 0 (a server drains, then releases
the followers).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence

from hybridgraph.parallel.group import set_safe_env

# After rank 0 exits cleanly, the followers (released by its STOP) must exit within this.
FOLLOWER_EXIT_S = 30.0
# A terminated rank gets this long to exit before it is killed.
TERMINATE_GRACE_S = 5.0


class RankFailed(RuntimeError):
    """A rank exited with an error or a signal (or hung at the end); the others were stopped."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, size: int, port: int, base: dict[str, str] | None = None,
             ) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    env.update(RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(rank),
               LOCAL_WORLD_SIZE=str(size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    return set_safe_env(env)


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit status {code}"


def stop_all(procs: Sequence[subprocess.Popen], grace_s: float = TERMINATE_GRACE_S) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def watch(procs: Sequence[subprocess.Popen], follower_exit_s: float = FOLLOWER_EXIT_S,
          poll_s: float = 0.05) -> int:
    """Wait for every rank; 0 when all exit cleanly, else RankFailed (others stopped)."""
    done_at: float | None = None
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                rank, code = failed[0]
                stop_all(procs)
                raise RankFailed(f"rank {rank} of {len(procs)} stopped with {_describe(code)}; "
                                 "the other ranks were stopped")
            if all(c == 0 for c in codes):
                return 0
            if codes[0] == 0 and done_at is None:
                done_at = time.monotonic()
            if done_at is not None and time.monotonic() - done_at > follower_exit_s:
                left = [r for r, c in enumerate(codes) if c is None]
                stop_all(procs)
                raise RankFailed(f"rank 0 finished but ranks {left} did not exit within "
                                 f"{follower_exit_s:.0f} s; they were stopped")
            time.sleep(poll_s)
    except BaseException:
        stop_all(procs)
        raise


def launch(tp: int, argv: Sequence[str], follower_exit_s: float = FOLLOWER_EXIT_S,
           env: dict[str, str] | None = None) -> int:
    """Run `python *argv` as ranks 0..tp-1 and watch them (see `watch`)."""
    port = free_port()
    procs: list[subprocess.Popen] = []
    forwarded = _forward_signals(procs)
    try:
        for rank in range(tp):
            # A session of their own: a terminal's Ctrl-C reaches the launcher only, which
            # passes it to rank 0, rather than every rank dying at once mid-collective.
            procs.append(subprocess.Popen([sys.executable, *argv], start_new_session=True,
                                          env=rank_env(rank, tp, port, env)))
        return watch(procs, follower_exit_s)
    finally:
        stop_all(procs)
        for sig, old in forwarded.items():
            signal.signal(sig, old)


def _forward_signals(procs: list[subprocess.Popen]) -> dict[int, object]:
    """SIGTERM/SIGINT to the launcher go to rank 0 (a second one stops every rank)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return {}
    seen = []

    def handler(signum: int, _frame: object) -> None:
        seen.append(signum)
        if len(seen) > 1:
            raise KeyboardInterrupt
        if procs and procs[0].poll() is None:
            procs[0].send_signal(signal.SIGTERM)

    old = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        old[sig] = signal.signal(sig, handler)
    return old
