"""The worker's queue: round-robin across peers, FIFO within one, so a process that opens
many connections and fills them gets one turn in each round like everyone else.

A peer is the client process (its pid, from SO_PEERCRED), or the connection where the
platform can't say. Thread-safe: the loop puts, the engine thread takes.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from collections.abc import Hashable
from typing import Generic, TypeVar

T = TypeVar("T")


class FairQueue(Generic[T]):
    def __init__(self) -> None:
        self._peers: OrderedDict[Hashable, deque[T]] = OrderedDict()
        self._n = 0
        self._closed = False
        self._cv = threading.Condition()

    def put(self, peer: Hashable, item: T) -> None:
        with self._cv:
            q = self._peers.get(peer)
            if q is None:
                q = self._peers[peer] = deque()  # a new peer joins the round at its end
            q.append(item)
            self._n += 1
            self._cv.notify()

    def get(self, block: bool = True) -> T | None:
        """The next item in round-robin order; None once closed and empty. block=False:
        None at once when nothing is queued (the batching worker asks between steps)."""
        with self._cv:
            while block and not self._n and not self._closed:
                self._cv.wait()
            if not self._n:
                return None
            peer, q = next(iter(self._peers.items()))
            item = q.popleft()
            self._n -= 1
            if q:
                self._peers.move_to_end(peer)  # served: to the back of the round
            else:
                del self._peers[peer]
            return item

    def close(self) -> None:
        """Wake the taker; it drains what is queued, then gets None."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()

    @property
    def drained(self) -> bool:
        """Closed, and nothing is left to take."""
        with self._cv:
            return self._closed and not self._n

    def qsize(self) -> int:
        return self._n

    def empty(self) -> bool:
        return self._n == 0
