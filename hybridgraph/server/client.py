"""Clients of the graph server: `Client` (blocking) and `AsyncClient` (asyncio).

    with Client("/tmp/hg.sock") as c:
        reply = c.generate(prompt_ids=[1, 450, 4996], max_new_tokens=16,
                           sampling=SamplingParams(temperature=0.7, top_p=0.9, seed=1))
        for token in c.stream(text="Hello", max_new_tokens=16, temperature=0.7):
            ...

Sampling is a `SamplingParams` (checked when built, so a bad value fails here, naming the
field) or its fields as keywords. Both clients raise `ServerError` (with `code`, `field`,
`message`) for an error reply, wait at most `timeout` seconds for each reply frame (a
stream's tokens each reset it; None waits forever), and refuse a request_id that is still
in flight on their connection. Neither imports torch: a client process stays light.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import socket
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

from hybridgraph.request import SamplingParams
from hybridgraph.server.protocol import RequestId, encode_frame, read_frame, recv_frame

CLIENT_MAX_FRAME_BYTES = 64 << 20  # the server is trusted; this only bounds a broken one
DEFAULT_TIMEOUT_S = 300.0  # per reply frame: long enough for a long non-streamed generation


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
    # Random start: a user's own request_ids are unlikely to collide with ours.
    return itertools.count(random.getrandbits(48) << 8)


def _sampling(sampling: SamplingParams | None, fields: dict[str, Any]) -> SamplingParams:
    given = {k: v for k, v in fields.items() if v is not None}
    if sampling is not None and given:
        raise TypeError(f"give either sampling or {', '.join(given)}, not both")
    return SamplingParams(**given) if given else SamplingParams.of(sampling)


def _generate_msg(rid: RequestId, prompt_ids: Sequence[int] | None, text: str | None,
                  max_new_tokens: int, sampling: SamplingParams,
                  stop_ids: Sequence[int] | None, stream: bool) -> dict[str, Any]:
    msg: dict[str, Any] = {"type": "generate", "request_id": rid,
                           "max_new_tokens": max_new_tokens, "stream": stream,
                           **sampling.to_wire()}
    if prompt_ids is not None:
        msg["prompt_ids"] = list(prompt_ids)
    if text is not None:
        msg["text"] = text
    if stop_ids is not None:
        msg["stop_ids"] = list(stop_ids)
    return msg


def _in_flight(rid: RequestId) -> ValueError:
    return ValueError(f"request_id {rid!r} is already in flight on this connection; "
                      f"its replies could not be told apart")


def _check(reply: dict[str, Any]) -> dict[str, Any]:
    if reply.get("type") == "error":
        raise ServerError(reply)
    return reply


class Client:
    """Blocking client over one connection. Use one per thread."""

    def __init__(self, socket_path: str, timeout: float | None = DEFAULT_TIMEOUT_S,
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

    def _new_id(self, request_id: RequestId | None) -> RequestId:
        if request_id is None:
            return next(self._ids)
        if request_id in self._discard:  # abandoned, but the server may still run it
            raise _in_flight(request_id)
        return request_id

    def generate(self, prompt_ids: Sequence[int] | None = None, text: str | None = None,
                 max_new_tokens: int = 32, sampling: SamplingParams | None = None, *,
                 stop_ids: Sequence[int] | None = None, stream: bool = False,
                 on_token: Callable[[int], None] | None = None,
                 request_id: RequestId | None = None, temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None,
                 seed: int | None = None) -> dict[str, Any]:
        """Generate; returns the final reply (tokens, text, ttft_ms, latency_ms,
        finish_reason, ...). With stream=True, on_token sees each token as it arrives."""
        sp = _sampling(sampling, dict(temperature=temperature, top_k=top_k, top_p=top_p,
                                      seed=seed))
        if stream:
            for token in self.stream(prompt_ids, text, max_new_tokens, sp, stop_ids=stop_ids,
                                     request_id=request_id):
                if on_token is not None:
                    on_token(token)
            assert self.last_reply is not None
            return self.last_reply
        rid = self._new_id(request_id)
        return self._call(_generate_msg(rid, prompt_ids, text, max_new_tokens, sp, stop_ids,
                                        False))

    def stream(self, prompt_ids: Sequence[int] | None = None, text: str | None = None,
               max_new_tokens: int = 32, sampling: SamplingParams | None = None, *,
               stop_ids: Sequence[int] | None = None, request_id: RequestId | None = None,
               temperature: float | None = None, top_k: int | None = None,
               top_p: float | None = None, seed: int | None = None) -> Iterator[int]:
        """Yield token ids as the server streams them; the final reply is then in
        `last_reply`. Leaving the loop early cancels the request."""
        sp = _sampling(sampling, dict(temperature=temperature, top_k=top_k, top_p=top_p,
                                      seed=seed))
        rid = self._new_id(request_id)
        return self._stream(_generate_msg(rid, prompt_ids, text, max_new_tokens, sp, stop_ids,
                                          True))

    def _stream(self, msg: dict[str, Any]) -> Iterator[int]:
        rid = msg["request_id"]
        self._send(msg)
        done = False
        try:
            while True:
                reply = _check(self._recv(rid))
                if reply["type"] == "token":
                    yield reply["token"]
                    continue
                done = True
                self.last_reply = reply
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
        """Capture prefill graphs for these prompt lengths now; returns graphs held (an
        admin request: the server must run with --allow-admin)."""
        return self._call({"type": "capture", "request_id": next(self._ids),
                           "lengths": list(lengths)})["graphs"]

    def cancel(self, request_id: RequestId) -> bool:
        """Cancel one of this connection's generate requests; False if none of that id is
        in flight here (other clients' requests are out of reach)."""
        return self._call({"type": "cancel", "request_id": next(self._ids),
                           "target": request_id})["cancelled"]

    def shutdown(self) -> None:
        """Ask the server to drain and exit (an admin request: --allow-admin)."""
        self._call({"type": "shutdown", "request_id": next(self._ids)})


class AsyncClient:
    """asyncio client; many requests may run at once over its one connection."""

    def __init__(self, socket_path: str, timeout: float | None = DEFAULT_TIMEOUT_S,
                 max_frame_bytes: int = CLIENT_MAX_FRAME_BYTES) -> None:
        self.path, self.timeout, self.max_frame_bytes = socket_path, timeout, max_frame_bytes
        self._ids = _ids()
        self._queues: dict[RequestId, asyncio.Queue[dict[str, Any] | BaseException]] = {}
        self._abandoned: set[RequestId] = set()  # the server may still send for these
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None
        self._error: BaseException | None = None

    async def connect(self) -> AsyncClient:
        async with asyncio.timeout(self.timeout):
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
                    raise ServerError(msg)  # about the connection, not one request
                q = self._queues.get(rid)
                if q is not None:
                    q.put_nowait(msg)
                elif rid in self._abandoned and msg.get("type") != "token":
                    self._abandoned.discard(rid)  # its last frame: the id is free again
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
        rid = msg["request_id"]
        if rid in self._queues or rid in self._abandoned:
            raise _in_flight(rid)
        q: asyncio.Queue[dict[str, Any] | BaseException] = asyncio.Queue()
        self._queues[rid] = q
        self._writer.write(encode_frame(msg))
        await self._writer.drain()
        return q

    async def _next(self, rid: RequestId,
                    q: asyncio.Queue[dict[str, Any] | BaseException]) -> dict[str, Any]:
        try:
            async with asyncio.timeout(self.timeout):
                m = await q.get()
        except TimeoutError:
            self._abandon(rid)
            raise TimeoutError(f"no reply to request {rid!r} in {self.timeout} s; "
                               f"cancelled it") from None
        if isinstance(m, BaseException):
            raise m
        return _check(m)

    def _abandon(self, rid: RequestId) -> None:
        """Stop waiting for `rid`: cancel it and drop its late frames."""
        if self._queues.pop(rid, None) is None:
            return
        self._abandoned.add(rid)
        if self._writer is not None and not self._writer.is_closing():
            cancel_id = next(self._ids)
            self._abandoned.add(cancel_id)
            self._writer.write(encode_frame({"type": "cancel", "request_id": cancel_id,
                                             "target": rid}))

    async def _call(self, msg: dict[str, Any]) -> dict[str, Any]:
        rid = msg["request_id"]
        q = await self._open(msg)  # outside the try: a refused id must not drop the other's
        try:
            return await self._next(rid, q)
        finally:
            self._queues.pop(rid, None)

    def _msg(self, prompt_ids: Sequence[int] | None, text: str | None, max_new_tokens: int,
             sampling: SamplingParams | None, fields: dict[str, Any],
             stop_ids: Sequence[int] | None, stream: bool,
             request_id: RequestId | None) -> dict[str, Any]:
        rid = next(self._ids) if request_id is None else request_id
        return _generate_msg(rid, prompt_ids, text, max_new_tokens, _sampling(sampling, fields),
                             stop_ids, stream)

    async def generate(self, prompt_ids: Sequence[int] | None = None, text: str | None = None,
                       max_new_tokens: int = 32, sampling: SamplingParams | None = None, *,
                       stop_ids: Sequence[int] | None = None, stream: bool = False,
                       on_token: Callable[[int], None] | None = None,
                       request_id: RequestId | None = None, temperature: float | None = None,
                       top_k: int | None = None, top_p: float | None = None,
                       seed: int | None = None) -> dict[str, Any]:
        """As Client.generate."""
        msg = self._msg(prompt_ids, text, max_new_tokens, sampling,
                        dict(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed),
                        stop_ids, stream, request_id)
        if not stream:
            return await self._call(msg)
        rid = msg["request_id"]
        q = await self._open(msg)
        done = False
        try:
            while True:
                m = await self._next(rid, q)
                if m["type"] != "token":
                    done = True
                    return m
                if on_token is not None:
                    on_token(m["token"])
        except ServerError:
            done = True
            raise
        finally:
            if not done:
                self._abandon(rid)
            self._queues.pop(rid, None)

    async def stream(self, prompt_ids: Sequence[int] | None = None, text: str | None = None,
                     max_new_tokens: int = 32, sampling: SamplingParams | None = None, *,
                     stop_ids: Sequence[int] | None = None, request_id: RequestId | None = None,
                     temperature: float | None = None, top_k: int | None = None,
                     top_p: float | None = None, seed: int | None = None) -> AsyncIterator[int]:
        """Yield token ids as they arrive; leaving early cancels the request."""
        msg = self._msg(prompt_ids, text, max_new_tokens, sampling,
                        dict(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed),
                        stop_ids, True, request_id)
        rid = msg["request_id"]
        q = await self._open(msg)
        done = False
        try:
            while True:
                try:
                    m = await self._next(rid, q)
                except ServerError:
                    done = True
                    raise
                if m["type"] != "token":
                    done = True
                    return
                yield m["token"]
        finally:
            if not done:
                self._abandon(rid)
            self._queues.pop(rid, None)

    async def status(self) -> dict[str, Any]:
        return (await self._call({"type": "status", "request_id": next(self._ids)}))["status"]

    async def capture(self, lengths: Sequence[int]) -> int:
        """Capture prefill graphs for these lengths (an admin request: --allow-admin)."""
        return (await self._call({"type": "capture", "request_id": next(self._ids),
                                  "lengths": list(lengths)}))["graphs"]

    async def cancel(self, request_id: RequestId) -> bool:
        """Cancel one of this connection's generate requests."""
        return (await self._call({"type": "cancel", "request_id": next(self._ids),
                                  "target": request_id}))["cancelled"]

    async def shutdown(self) -> None:
        """Ask the server to drain and exit (an admin request: --allow-admin)."""
        await self._call({"type": "shutdown", "request_id": next(self._ids)})
