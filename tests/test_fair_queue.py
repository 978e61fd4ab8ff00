"""The fair queue: round-robin across peers, FIFO within one."""

from __future__ import annotations

import threading

from hybridgraph.server.fair_queue import FairQueue


def test_round_robin_across_peers_fifo_within() -> None:
    q: FairQueue[str] = FairQueue()
    for i in range(4):
        q.put("hog", f"h{i}")
    q.put("me", "m0")
    q.put("me", "m1")
    q.put("late", "l0")
    assert q.qsize() == 7
    assert [q.get() for _ in range(7)] == ["h0", "m0", "l0", "h1", "m1", "h2", "h3"]
    assert q.empty()


def test_close_drains_then_ends_a_blocked_taker() -> None:
    q: FairQueue[int] = FairQueue()
    got: list[int | None] = []
    t = threading.Thread(target=lambda: got.extend([q.get(), q.get(), q.get()]))
    t.start()
    q.put("a", 1)
    q.put("b", 2)
    q.close()
    t.join(5)
    assert not t.is_alive() and got == [1, 2, None]


def test_get_without_blocking_and_drained() -> None:
    q: FairQueue[int] = FairQueue()
    assert q.get(block=False) is None and not q.drained   # empty, still open
    q.put("a", 1)
    q.close()
    assert not q.drained                                   # closed, one left to take
    assert q.get(block=False) == 1
    assert q.drained and q.get(block=False) is None
