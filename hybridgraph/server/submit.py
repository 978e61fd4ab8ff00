"""What a front other than the socket (HTTP) holds for one request it submitted to the
server's engine worker: a stream of typed events, and a way to cancel.

    stream = RequestStream(peer=("http", host, port))
    await server.submit(GenerateRequest(...), stream)  # ProtocolError if refused
    async for event in stream:                     # TokenEvent..., then ResultEvent | ErrorEvent
        ...
    stream.cancel()                                # e.g. the HTTP client went away

The server treats a RequestStream like a socket Connection: it files the job in `jobs` and
calls `send` on the event loop with each reply, in order. Nothing here touches the engine.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from hybridgraph.server.connection import Job


@dataclass(frozen=True, slots=True)
class TokenEvent:
    token: int
    index: int
    text: str  # the engine's text delta: whole characters, stop strings left out


@dataclass(frozen=True, slots=True)
class ResultEvent:
    tokens: list[int]
    text: str | None
    prompt_len: int
    finish_reason: str   # "stop" | "length" | "cancelled"
    ttft_ms: float       # submit -> first token, queueing included
    latency_ms: float    # submit -> result
    queue_ms: float      # submit -> the worker took it
    engine_ttft_ms: float  # inside the engine: prompt on the host -> first token on the host


@dataclass(frozen=True, slots=True)
class ErrorEvent:
    code: str
    message: str
    field: str | None


Event = TokenEvent | ResultEvent | ErrorEvent


class Front(Protocol):
    """A way in besides the socket (HTTP). The server starts it before it says ready and
    stops it after draining, so its requests drain with the socket's."""

    @property
    def where(self) -> str: ...  # for the ready line, e.g. "http://127.0.0.1:8000"

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class RequestStream:
    """One submitted request seen from its front. Iterate it for events (the last one is a
    ResultEvent or an ErrorEvent); `cancel()` stops the engine at its next token.
    `on_done` runs on the loop once the request has left the worker (its slot is free)."""

    def __init__(self, peer: Hashable, on_done: Callable[[], None] | None = None) -> None:
        self.peer = peer  # whose turn in the server's fair queue this request takes
        self.jobs: dict[Any, Job] = {}  # filled by Server.submit, emptied by its _finish
        self.open = True
        self.last_active = 0.0  # the server stamps it, as on a Connection
        self.finished = False
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self._on_done = on_done

    # ------------------------------------------------------------ the server's side

    def send(self, msg: dict[str, Any]) -> None:
        kind = msg["type"]
        if kind == "token":
            self._events.put_nowait(TokenEvent(msg["token"], msg["index"], msg["text"]))
            return
        if kind == "result":
            event: Event = ResultEvent(msg["tokens"], msg["text"], msg["prompt_len"],
                                       msg["finish_reason"], msg["ttft_ms"],
                                       msg["latency_ms"], msg["queue_ms"],
                                       msg["engine_ttft_ms"])
        else:
            event = ErrorEvent(msg.get("code", "internal"), msg.get("message", ""),
                               msg.get("field"))
        self.finished, self.open = True, False
        self._events.put_nowait(event)
        if self._on_done is not None:
            self._on_done()

    # ------------------------------------------------------------- the front's side

    def cancel(self) -> None:
        for job in self.jobs.values():
            job.cancelled = True

    async def next(self) -> Event:
        return await self._events.get()

    async def __aiter__(self) -> AsyncIterator[Event]:
        while True:
            event = await self._events.get()
            yield event
            if not isinstance(event, TokenEvent):
                return
