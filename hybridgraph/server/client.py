"""Clients of the graph server: `Client` (blocking) and `AsyncClient` (asyncio).

    with Client("/tmp/hg.sock") as c:
        reply = c.generate(prompt_ids=[1, 450, 4996], max_new_tokens=16)
        for token in c.stream(text="Hello", max_new_tokens=16):
            ...

Both raise `ServerError` (with `code`, `field`, `message`) for an error reply. Neither
imports torch: a client process stays light.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import socket
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

from hybridgraph.server.protocol import RequestId, encode_frame, read_frame, recv_frame

CLIENT_MAX_FRAME_BYTES = 64 << 20  # the server is trusted; this only bounds a broken one


class ServerError(RuntimeError):
    """An error reply from the server."""

    def __init__(self, reply: dict[str, Any]) -> None:
        self.code: str = reply.get("code", "unknown")
        self.field: str | None = reply.get("field")
        self.message: str = reply.get("message", "")
        self.request_id: RequestId | None = reply.get("request_id")
        self.reply = reply
        where = f" [{self.field}]" if self.field else ""
        super().__init__(f"{self.code}{where}: {self.message}")


def _ids() -> Iterator[int]:
    # Random start: ids are unique across clients, so a cancel from another connection
    # names one request.
    return itertools.count(random.getrandbits(48) << 8)


def _generate_msg(rid: RequestId, prompt_ids: Sequence[int] | None, text: str | None,
                  max_new_tokens: int, temperature: float, top_k: int, top_p: float,
                  seed: int | None, stop_ids: Sequence[int] | None, stream: bool) -> dict[str, Any]:
    msg: dict[str, Any] = {"type": "generate", "request_id": rid,
                           "max_new_tokens": max_new_tokens, "temperature": temperature,
                           "top_k": top_k, "top_p": top_p, "stream": stream}
    if prompt_ids is not None:
        msg["prompt_ids"] = list(prompt_ids)
    if text is not None:
        msg["text"] = text
    if seed is not None:
        msg["seed"] = seed
    if stop_ids is not None:
        msg["stop_ids"] = list(stop_ids)
    return msg


def _check(reply: dict[str, Any]) -> dict[str, Any]:
    if reply.get("type") == "error":
        raise ServerError(reply)
    return reply


class Client:
    """Blocking client over one connection. Use one per thread."""

    def __init__(self, socket_path: str, timeout: float | None = None,
                 max_frame_bytes: int = CLIENT_MAX_FRAME_BYTES) -> None:
        self.path, self.max_frame_bytes = socket_path, max_frame_bytes
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(socket_path)
        except OSError:
            self.sock.close()
            raise
        self._ids = _ids()
        self._held: dict[RequestId | None, deque[dict[str, Any]]] = {}
        self._discard: set[RequestId] = set()  # abandoned requests whose frames we drop
        self.last_reply: dict[str, Any] | None = None  # the final reply of the last stream()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    # ------------------------------------------------------------------------ wire

    def _send(self, msg: dict[str, Any]) -> None:
        self.sock.sendall(encode_frame(msg))

    def _recv(self, rid: RequestId) -> dict[str, Any]:
        """The next frame for `rid`, holding back frames that belong to other requests."""
        held = self._held.get(rid)
        if held:
            return held.popleft()
        while True:
            try:
                msg = recv_frame(self.sock, self.max_frame_bytes)
            except OSError:
                # A timeout or error mid-frame leaves the byte stream out of step: this
                # connection can't be trusted again, so close it rather than misread later.
                self.close()
                raise
            if msg is None:
                raise ConnectionError("the server closed the connection")
            mrid = msg.get("request_id")
            if mrid == rid:
                return msg
            if mrid is None and msg.get("type") == "error":
                raise ServerError(msg)  # about the connection, not one request
            if mrid in self._discard:
                if msg.get("type") != "token":
                    self._discard.discard(mrid)
                continue
            self._held.setdefault(mrid, deque()).append(msg)

    def _call(self, msg: dict[str, Any]) -> dict[str, Any]:
        self._send(msg)
        return _check(self._recv(msg["request_id"]))

    # ---------------------------------------------------------------------- requests

    def generate(self, prompt_ids: Sequence[int] | None = None, text: str | None = None,
                 max_new_tokens: int = 32, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int | None = None,
                 stop_ids: Sequence[int] | None = None, stream: bool = False,
                 on_token: Callable[[int], None] | None = None,
                 request_id: RequestId | None = None) -> dict[str, Any]:
        """Generate; returns the final reply (tokens, text, ttft_ms, latency_ms,
        finish_reason, ...). With stream=True, on_token sees each token as it arrives."""
        if stream:
            it = self.stream(prompt_ids, text, max_new_tokens, temperature, top_k, top_p, seed,
                             stop_ids, request_id)
            for token in it:
                if on_token is not None:
                    on_token(token)
            assert self.last_reply is not None
            return self.last_reply
        rid = next(self._ids) if request_id is None else request_id
        return self._call(_generate_msg(rid, prompt_ids, text, max_new_tokens, temperature,
                                        top_k, top_p, seed, stop_ids, False))

    def stream(self, prompt_ids: Sequence[int] | None = None, text: str | None = None,
               max_new_tokens: int = 32, temperature: float = 0.0, top_k: int = 0,
               top_p: float = 1.0, seed: int | None = None,
               stop_ids: Sequence[int] | None = None,
               request_id: RequestId | None = None) -> Iterator[int]:
        """Yield token ids as the server streams them; the final reply is then in
        `last_reply`. Leaving the loop early cancels the request."""
        rid = next(self._ids) if request_id is None else request_id
        self._send(_generate_msg(rid, prompt_ids, text, max_new_tokens, temperature, top_k,
                                 top_p, seed, stop_ids, True))
        done = False
        try:
            while True:
                msg = _check(self._recv(rid))
                if msg["type"] == "token":
                    yield msg["token"]
                    continue
                done = True
                self.last_reply = msg
                return
        except ServerError:
            done = True
            raise
        finally:
            if not done:
                self._abandon(rid)

    def _abandon(self, rid: RequestId) -> None:
        self._discard.add(rid)
        self._held.pop(rid, None)
        cancel_id = next(self._ids)
        self._discard.add(cancel_id)
        try:
            self._send({"type": "cancel", "request_id": cancel_id, "target": rid})
        except OSError:
            pass

    def status(self) -> dict[str, Any]:
        return self._call({"type": "status", "request_id": next(self._ids)})["status"]

    def capture(self, lengths: Sequence[int]) -> int:
        """Capture prefill graphs for these prompt lengths now; returns graphs held."""
        return self._call({"type": "capture", "request_id": next(self._ids),
                           "lengths": list(lengths)})["graphs"]

    def cancel(self, request_id: RequestId) -> bool:
        """Cancel a generate request (of any client); False if none was in flight."""
        return self._call({"type": "cancel", "request_id": next(self._ids),
                           "target": request_id})["cancelled"]

    def shutdown(self) -> None:
        """Ask the server to drain and exit."""
        self._call({"type": "shutdown", "request_id": next(self._ids)})


class AsyncClient:
    """asyncio client; many requests may run at once over its one connection."""

    def __init__(self, socket_path: str, max_frame_bytes: int = CLIENT_MAX_FRAME_BYTES) -> None:
        self.path, self.max_frame_bytes = socket_path, max_frame_bytes
        self._ids = _ids()
        self._queues: dict[RequestId, asyncio.Queue[dict[str, Any] | BaseException]] = {}
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None
        self._error: BaseException | None = None

    async def connect(self) -> AsyncClient:
        self._reader, self._writer = await asyncio.open_unix_connection(self.path)
        self._task = asyncio.create_task(self._read_loop())
        return self

    async def __aenter__(self) -> AsyncClient:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            try:
                await self._writer.wait_closed()
            except OSError:
                pass
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _read_loop(self) -> None:
        assert self._reader is not None
        try:
            while True:
                msg = await read_frame(self._reader, self.max_frame_bytes)
                if msg is None:
                    raise ConnectionError("the server closed the connection")
                rid = msg.get("request_id")
                if rid is None and msg.get("type") == "error":
                    raise ServerError(msg)
                q = self._queues.get(rid)
                if q is not None:  # else: a request we abandoned
                    q.put_nowait(msg)
        except asyncio.CancelledError:
            self._error = ConnectionError("client closed")
            raise
        except Exception as e:
            self._error = e
        finally:
            for q in self._queues.values():
                q.put_nowait(self._error or ConnectionError("connection lost"))

    async def _open(self, msg: dict[str, Any]) -> asyncio.Queue[dict[str, Any] | BaseException]:
        if self._writer is None:
            raise ConnectionError("not connected; use `async with AsyncClient(path)` or connect()")
        if self._error is not None:
            raise self._error
        q: asyncio.Queue[dict[str, Any] | BaseException] = asyncio.Queue()
        self._queues[msg["request_id"]] = q
        self._writer.write(encode_frame(msg))
        await self._writer.drain()
        return q

    @staticmethod
    async def _next(q: asyncio.Queue[dict[str, Any] | BaseException]) -> dict[str, Any]:
        m = await q.get()
        if isinstance(m, BaseException):
            raise m
        return _check(m)

    async def _call(self, msg: dict[str, Any]) -> dict[str, Any]:
        try:
            return await self._next(await self._open(msg))
        finally:
            self._queues.pop(msg["request_id"], None)

    async def generate(self, prompt_ids: Sequence[int] | None = None, text: str | None = None,
                       max_new_tokens: int = 32, temperature: float = 0.0, top_k: int = 0,
                       top_p: float = 1.0, seed: int | None = None,
                       stop_ids: Sequence[int] | None = None, stream: bool = False,
                       on_token: Callable[[int], None] | None = None,
                       request_id: RequestId | None = None) -> dict[str, Any]:
        """As Client.generate."""
        rid = next(self._ids) if request_id is None else request_id
        msg = _generate_msg(rid, prompt_ids, text, max_new_tokens, temperature, top_k, top_p,
                            seed, stop_ids, stream)
        if not stream:
            return await self._call(msg)
        q = await self._open(msg)
        try:
            while True:
                m = await self._next(q)
                if m["type"] != "token":
                    return m
                if on_token is not None:
                    on_token(m["token"])
        finally:
            self._queues.pop(rid, None)

    async def stream(self, prompt_ids: Sequence[int] | None = None, text: str | None = None,
                     max_new_tokens: int = 32, temperature: float = 0.0, top_k: int = 0,
                     top_p: float = 1.0, seed: int | None = None,
                     stop_ids: Sequence[int] | None = None,
                     request_id: RequestId | None = None) -> AsyncIterator[int]:
        """Yield token ids as they arrive; leaving early cancels the request."""
        rid = next(self._ids) if request_id is None else request_id
        q = await self._open(_generate_msg(rid, prompt_ids, text, max_new_tokens, temperature,
                                           top_k, top_p, seed, stop_ids, True))
        done = False
        try:
            while True:
                try:
                    m = await self._next(q)
                except ServerError:
                    done = True
                    raise
                if m["type"] != "token":
                    done = True
                    return
                yield m["token"]
        finally:
            self._queues.pop(rid, None)
            if not done and self._writer is not None and not self._writer.is_closing():
                self._writer.write(encode_frame({"type": "cancel", "request_id": next(self._ids),
                                                 "target": rid}))

    async def status(self) -> dict[str, Any]:
        return (await self._call({"type": "status", "request_id": next(self._ids)}))["status"]

    async def capture(self, lengths: Sequence[int]) -> int:
        return (await self._call({"type": "capture", "request_id": next(self._ids),
                                  "lengths": list(lengths)}))["graphs"]

    async def cancel(self, request_id: RequestId) -> bool:
        return (await self._call({"type": "cancel", "request_id": next(self._ids),
                                  "target": request_id}))["cancelled"]

    async def shutdown(self) -> None:
        await self._call({"type": "shutdown", "request_id": next(self._ids)})
