"""Clients of the graph server: `Client` (blocking, here) and `AsyncClient` (asyncio,
async_client.py, also importable from here).

    with Client("/tmp/hg.sock") as c:
        reply = c.generate(prompt_ids=[1, 450, 4996], max_new_tokens=16,
                           sampling=SamplingParams(temperature=0.7, top_p=0.9, seed=1))
        for token in c.stream(text="Hello", max_new_tokens=16, temperature=0.7):
            ...

Sampling is a `SamplingParams` or its fields as keywords, checked before anything is sent
(`SamplingParams.validate`, the one owner of their bounds), so a bad value fails here,
naming the field. Both clients raise `ServerError` (with `code`, `field`,
`message`) for an error reply, wait at most `timeout` seconds for each reply frame (a
stream's tokens each reset it; None waits forever), and refuse a request_id that is still
in flight on their connection. Neither imports torch: a client process stays light.
"""

from __future__ import annotations

import itertools
import random
import socket
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from hybridgraph.request import SamplingParams
from hybridgraph.server.protocol import RequestId, encode_frame, recv_frame

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
    return SamplingParams(**given).validate() if given else SamplingParams.of(sampling)


def _generate_msg(rid: RequestId, prompt_ids: Sequence[int] | None, text: str | None,
                  max_new_tokens: int, sampling: SamplingParams,
                  stop_ids: Sequence[int] | None, stream: bool,
                  **text_fields: Any) -> dict[str, Any]:
    """text_fields (issue 11): messages, stop, ignore_eos; None leaves one out."""
    msg: dict[str, Any] = {"type": "generate", "request_id": rid,
                           "max_new_tokens": max_new_tokens, "stream": stream,
                           **sampling.to_wire(),
                           **{k: list(v) if isinstance(v, list | tuple) else v
                              for k, v in text_fields.items() if v is not None}}
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


class _Pending:
    """A streamed request in flight, for both clients. Leaving its `with` block before it
    ended (the caller sets `done` at the final reply; an error reply ends it too), say by
    a timeout or a consumer that stopped early, abandons it: `abandon` cancels it on the
    server and drops its late frames, so the request id does not stay half-read."""

    def __init__(self, abandon: Callable[[], None]) -> None:
        self.abandon, self.done = abandon, False

    def __enter__(self) -> _Pending:
        return self

    def __exit__(self, typ: type[BaseException] | None, exc: BaseException | None,
                 tb: object) -> None:
        if not self.done and not isinstance(exc, ServerError):
            self.abandon()


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
                 seed: int | None = None, messages: Sequence[dict[str, str]] | None = None,
                 stop: Sequence[str] | None = None, ignore_eos: bool | None = None,
                 on_text: Callable[[str], None] | None = None) -> dict[str, Any]:
        """Generate; returns the final reply (tokens, text, ttft_ms, latency_ms,
        finish_reason, ...). With stream=True, on_token sees each token as it arrives and
        on_text its text delta (giving on_text streams). messages (instead of prompt_ids
        or text) go through the model's chat template; a stop string ends the text, left
        out of it; ignore_eos runs past the model's end ids."""
        sp = _sampling(sampling, dict(temperature=temperature, top_k=top_k, top_p=top_p,
                                      seed=seed))
        rid = self._new_id(request_id)
        msg = _generate_msg(rid, prompt_ids, text, max_new_tokens, sp, stop_ids,
                            stream or on_text is not None, messages=messages, stop=stop,
                            ignore_eos=ignore_eos)
        if not msg["stream"]:
            return self._call(msg)
        for frame in self._stream(msg, frames=True):
            if on_token is not None:
                on_token(frame["token"])
            if on_text is not None:
                on_text(frame.get("text") or "")
        assert self.last_reply is not None
        return self.last_reply

    def stream(self, prompt_ids: Sequence[int] | None = None, text: str | None = None,
               max_new_tokens: int = 32, sampling: SamplingParams | None = None, *,
               stop_ids: Sequence[int] | None = None, request_id: RequestId | None = None,
               temperature: float | None = None, top_k: int | None = None,
               top_p: float | None = None, seed: int | None = None,
               messages: Sequence[dict[str, str]] | None = None,
               stop: Sequence[str] | None = None,
               ignore_eos: bool | None = None) -> Iterator[int]:
        """Yield token ids as the server streams them; the final reply is then in
        `last_reply`. Leaving the loop early cancels the request."""
        sp = _sampling(sampling, dict(temperature=temperature, top_k=top_k, top_p=top_p,
                                      seed=seed))
        rid = self._new_id(request_id)
        return self._stream(_generate_msg(rid, prompt_ids, text, max_new_tokens, sp, stop_ids,
                                          True, messages=messages, stop=stop,
                                          ignore_eos=ignore_eos))

    def _stream(self, msg: dict[str, Any], frames: bool = False) -> Iterator[Any]:
        """Token ids (or, with frames, whole token frames: token, index, text)."""
        rid = msg["request_id"]
        self._send(msg)
        with _Pending(lambda: self._abandon(rid)) as pending:
            while True:
                reply = _check(self._recv(rid))
                if reply["type"] == "token":
                    yield reply if frames else reply["token"]
                    continue
                pending.done = True
                self.last_reply = reply
                return

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


def __getattr__(name: str) -> Any:
    # AsyncClient lives in its own module; it is importable from here too.
    if name == "AsyncClient":
        from hybridgraph.server.async_client import AsyncClient

        return AsyncClient
    raise AttributeError(name)
