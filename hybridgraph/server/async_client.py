"""`AsyncClient`: the asyncio client of the graph server (see client.py for the shared
rules: SamplingParams, timeouts, request ids in flight)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import aclosing
from typing import Any

from hybridgraph.request import SamplingParams
from hybridgraph.server.client import (
    CLIENT_MAX_FRAME_BYTES,
    DEFAULT_TIMEOUT_S,
    ServerError,
    _check,
    _generate_msg,
    _ids,
    _in_flight,
    _Pending,
    _sampling,
)
from hybridgraph.server.protocol import RequestId, encode_frame, read_frame


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
             request_id: RequestId | None, **text_fields: Any) -> dict[str, Any]:
        rid = next(self._ids) if request_id is None else request_id
        return _generate_msg(rid, prompt_ids, text, max_new_tokens, _sampling(sampling, fields),
                             stop_ids, stream, **text_fields)

    async def generate(self, prompt_ids: Sequence[int] | None = None, text: str | None = None,
                       max_new_tokens: int = 32, sampling: SamplingParams | None = None, *,
                       stop_ids: Sequence[int] | None = None, stream: bool = False,
                       on_token: Callable[[int], None] | None = None,
                       request_id: RequestId | None = None, temperature: float | None = None,
                       top_k: int | None = None, top_p: float | None = None,
                       seed: int | None = None,
                       messages: Sequence[dict[str, str]] | None = None,
                       stop: Sequence[str] | None = None, ignore_eos: bool | None = None,
                       on_text: Callable[[str], None] | None = None) -> dict[str, Any]:
        """As Client.generate."""
        stream = stream or on_text is not None
        msg = self._msg(prompt_ids, text, max_new_tokens, sampling,
                        dict(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed),
                        stop_ids, stream, request_id, messages=messages, stop=stop,
                        ignore_eos=ignore_eos)
        if not stream:
            return await self._call(msg)
        reply: dict[str, Any] = {}
        async with aclosing(self._frames(msg)) as frames:
            async for reply in frames:
                if reply["type"] != "token":
                    break
                if on_token is not None:
                    on_token(reply["token"])
                if on_text is not None:
                    on_text(reply.get("text") or "")
        return reply  # _frames ends with the final reply (or raises)

    async def stream(self, prompt_ids: Sequence[int] | None = None, text: str | None = None,
                     max_new_tokens: int = 32, sampling: SamplingParams | None = None, *,
                     stop_ids: Sequence[int] | None = None, request_id: RequestId | None = None,
                     temperature: float | None = None, top_k: int | None = None,
                     top_p: float | None = None, seed: int | None = None) -> AsyncIterator[int]:
        """Yield token ids as they arrive; leaving early cancels the request."""
        msg = self._msg(prompt_ids, text, max_new_tokens, sampling,
                        dict(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed),
                        stop_ids, True, request_id)
        async with aclosing(self._frames(msg)) as frames:
            async for m in frames:
                if m["type"] != "token":
                    return
                yield m["token"]

    async def _frames(self, msg: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Send a streamed request; yield its token frames, then its final reply. Callers
        close it at once (aclosing), so leaving early cancels the request then, not
        whenever the loop finalizes the generator."""
        rid = msg["request_id"]
        q = await self._open(msg)
        try:
            with _Pending(lambda: self._abandon(rid)) as pending:
                while not pending.done:
                    m = await self._next(rid, q)
                    pending.done = m["type"] != "token"
                    yield m
        finally:
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
