"""Wire protocol: a 4-byte big-endian length, then one MessagePack map.

Requests (every one carries `type` and `request_id`; the replies echo `request_id`):

    generate  prompt_ids: [int] | text: str | messages: [{role: str, content: str}]
              (exactly one; messages go through the model's chat template),
              max_new_tokens: int, temperature: float, top_k: int, top_p: float,
              seed: int | nil, stop_ids: [int] | nil, stop: [str] | nil (stop strings,
              left out of the text), ignore_eos: bool, stream: bool
    status    -
    cancel    target: request id of a generate request sent on this same connection
    capture   lengths: [int] (at most MAX_CAPTURE_LENGTHS)   admin: needs --allow-admin
    shutdown  -                                                admin: needs --allow-admin

Replies: `token` {token, index, text} (streamed, one per token; text is the token's
text delta, whole characters only: the deltas join to the result's text), `result` {tokens, text,
prompt_len, ttft_ms, latency_ms, queue_ms, finish_reason}, `status` {status},
`captured` {graphs}, `cancel` {cancelled}, `shutdown` {}, and `error` {code, field, message}.

An error reply carries the request_id of the request it ends. One that ends no request (a
frame that isn't a request, or a request_id already in flight on this connection, whose
echo would be mistaken for the first request's reply) carries a nil request_id. Codes are
the constants below; after a fatal one (frame_too_large, truncated, timeout, idle,
too_many_connections, too_many_errors) the server closes the connection. `busy` and
`forbidden` (an admin request to a server without --allow-admin) leave it open.

This module checks wire types; the bounds of the sampling fields belong to
`hybridgraph.request.SamplingParams`, which it builds. Only this module decodes bytes
from a socket. Nothing is ever unpickled: a body that is not exactly one MessagePack map
of known, well-typed fields is refused with an error naming why.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from dataclasses import dataclass
from typing import Any

import msgpack

from hybridgraph.request import RequestError, SamplingParams, check_stop_ids
from hybridgraph.text import validate_stop

HEADER = struct.Struct(">I")
DEFAULT_MAX_FRAME_BYTES = 1 << 20
MAX_REQUEST_ID_LEN = 128
MAX_LIST_LEN = 1 << 16  # prompt ids, stop ids
MAX_CAPTURE_LENGTHS = 64  # each capture takes time and GPU memory: ask in small steps
REQUEST_TYPES = ("generate", "status", "capture", "cancel", "shutdown")
ADMIN_TYPES = ("capture", "shutdown")

RequestId = int | str

# Error codes. `fatal` ones close the connection after the reply, because the byte stream
# can no longer be split into frames.
FRAME_TOO_LARGE = "frame_too_large"  # fatal
TRUNCATED = "truncated"              # fatal
TIMEOUT = "timeout"                  # fatal: a frame's bytes came too slowly
MALFORMED = "malformed"              # not MessagePack, or not a map with string keys
MISSING_FIELD = "missing_field"
UNKNOWN_FIELD = "unknown_field"
BAD_TYPE = "bad_type"
BAD_VALUE = "bad_value"
UNKNOWN_TYPE = "unknown_type"
DUPLICATE_ID = "duplicate_request_id"
SHUTTING_DOWN = "shutting_down"
BUSY = "busy"                         # the queue is full: try again later
FORBIDDEN = "forbidden"               # an admin request to a server started without them
TOO_MANY_CONNECTIONS = "too_many_connections"  # fatal
TOO_MANY_ERRORS = "too_many_errors"   # fatal: this connection kept sending refused frames
IDLE = "idle"                         # fatal: no request and no work for too long
INTERNAL = "internal"


class ProtocolError(Exception):
    """A frame or request the server refuses; becomes an `error` reply."""

    def __init__(self, code: str, message: str, field: str | None = None,
                 request_id: RequestId | None = None, fatal: bool = False) -> None:
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.field = code, message, field
        self.request_id, self.fatal = request_id, fatal

    def reply(self) -> dict[str, Any]:
        return error_reply(self.request_id, self.code, self.message, self.field)


# ------------------------------------------------------------------------------ framing

def encode_frame(msg: dict[str, Any]) -> bytes:
    body = msgpack.packb(msg, use_bin_type=True)
    return HEADER.pack(len(body)) + body


def frame_length(header: bytes, max_frame_bytes: int) -> int:
    """The body length a header announces; refused here, before any body byte is read."""
    (n,) = HEADER.unpack(header)
    if n > max_frame_bytes:
        raise ProtocolError(FRAME_TOO_LARGE, f"frame of {n} bytes exceeds the maximum of "
                                             f"{max_frame_bytes}", fatal=True)
    if n == 0:
        raise ProtocolError(MALFORMED, "empty frame body; expected one MessagePack map")
    return n


def decode_body(body: bytes) -> dict[str, Any]:
    try:
        # unpackb caps every container at the body's length, so a short body can't ask
        # for a huge allocation; strict_map_key keeps keys to str/bytes.
        msg = msgpack.unpackb(body, raw=False, strict_map_key=True, use_list=True)
    except Exception as e:  # msgpack raises several unrelated types on bad input
        raise ProtocolError(MALFORMED, f"body is not one valid MessagePack value "
                                       f"({type(e).__name__}: {e})") from None
    if not isinstance(msg, dict):
        raise ProtocolError(MALFORMED, f"body must be a MessagePack map, got "
                                       f"{_type_name(msg)}")
    for k in msg:
        if not isinstance(k, str):
            raise ProtocolError(MALFORMED, f"map keys must be strings, got {_type_name(k)}")
    return msg


def recv_exactly(sock: socket.socket, n: int) -> bytes | None:
    """n bytes from a blocking socket; None on EOF before the first byte."""
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            if got == 0:
                return None
            raise ConnectionError(f"connection closed mid-frame ({got} of {n} bytes)")
        got += k
    return bytes(buf)


def recv_frame(sock: socket.socket, max_frame_bytes: int) -> dict[str, Any] | None:
    """One frame from a blocking socket; None on a clean EOF between frames."""
    header = recv_exactly(sock, HEADER.size)
    if header is None:
        return None
    body = recv_exactly(sock, frame_length(header, max_frame_bytes))
    if body is None:
        raise ConnectionError("connection closed mid-frame")
    return decode_body(body)


async def read_frame(reader: asyncio.StreamReader, max_frame_bytes: int) -> dict[str, Any] | None:
    """One frame from a stream; None on a clean EOF between frames."""
    try:
        header = await reader.readexactly(HEADER.size)
    except asyncio.IncompleteReadError as e:
        if not e.partial:
            return None
        raise ConnectionError("connection closed mid-frame") from None
    try:
        body = await reader.readexactly(frame_length(header, max_frame_bytes))
    except asyncio.IncompleteReadError:
        raise ConnectionError("connection closed mid-frame") from None
    return decode_body(body)


# ------------------------------------------------------------------------------ replies

def error_reply(request_id: RequestId | None, code: str, message: str,
                field: str | None = None) -> dict[str, Any]:
    return {"type": "error", "request_id": request_id, "code": code, "field": field,
            "message": message}


# ----------------------------------------------------------------------------- requests

@dataclass(frozen=True)
class GenerateRequest:
    request_id: RequestId
    prompt_ids: list[int] | None
    text: str | None
    max_new_tokens: int = 32
    sampling: SamplingParams = SamplingParams()
    stop_ids: list[int] | None = None
    stream: bool = False
    # issue 11: chat messages (instead of prompt_ids / text), stop strings, ignore_eos
    messages: list[dict[str, str]] | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False


@dataclass(frozen=True)
class StatusRequest:
    request_id: RequestId


@dataclass(frozen=True)
class CaptureRequest:
    request_id: RequestId
    lengths: list[int]


@dataclass(frozen=True)
class CancelRequest:
    request_id: RequestId
    target: RequestId


@dataclass(frozen=True)
class ShutdownRequest:
    request_id: RequestId


Request = GenerateRequest | StatusRequest | CaptureRequest | CancelRequest | ShutdownRequest

_FIELDS: dict[str, set[str]] = {
    "generate": {"prompt_ids", "text", "messages", "max_new_tokens", "temperature", "top_k",
                 "top_p", "seed", "stop_ids", "stop", "ignore_eos", "stream"},
    "status": set(),
    "capture": {"lengths"},
    "cancel": {"target"},
    "shutdown": set(),
}


def parse_request(msg: dict[str, Any]) -> Request:
    """A decoded map -> a typed request, or ProtocolError naming the first bad field."""
    rid = _request_id(msg, "request_id")  # first, so every later error can echo it
    if "type" not in msg:
        raise ProtocolError(MISSING_FIELD, "missing field 'type'", "type", rid)
    kind = msg["type"]
    if not isinstance(kind, str):
        raise ProtocolError(BAD_TYPE, f"field 'type' must be a string, got {_type_name(kind)}",
                            "type", rid)
    if kind not in _FIELDS:
        raise ProtocolError(UNKNOWN_TYPE, f"unknown request type {kind[:64]!r}; expected one "
                                          f"of {', '.join(REQUEST_TYPES)}", "type", rid)
    for k in msg:
        if k not in ("type", "request_id") and k not in _FIELDS[kind]:
            raise ProtocolError(UNKNOWN_FIELD, f"unknown field {k[:64]!r} for a {kind} request",
                                k[:64], rid)
    f = _Fields(msg, rid)
    if kind == "status":
        return StatusRequest(rid)
    if kind == "shutdown":
        return ShutdownRequest(rid)
    if kind == "cancel":
        return CancelRequest(rid, _request_id(msg, "target", rid))
    if kind == "capture":
        lengths = f.int_list("lengths", required=True, lo=1)
        if not lengths:
            raise ProtocolError(BAD_VALUE, "field 'lengths' must not be empty", "lengths", rid)
        if len(lengths) > MAX_CAPTURE_LENGTHS:
            raise ProtocolError(BAD_VALUE, f"field 'lengths' has {len(lengths)} items; at most "
                                           f"{MAX_CAPTURE_LENGTHS} per capture request",
                                "lengths", rid)
        return CaptureRequest(rid, lengths)
    prompt_ids = f.int_list("prompt_ids", lo=0)
    text = f.get("text", str)
    messages = f.messages("messages")
    given = [name for name, v in (("prompt_ids", prompt_ids), ("text", text),
                                  ("messages", messages)) if v is not None]
    if len(given) != 1:
        raise ProtocolError(MISSING_FIELD if not given else BAD_VALUE,
                            "give exactly one of 'prompt_ids', 'text' and 'messages'",
                            given[1] if given else "prompt_ids", rid)
    if prompt_ids is not None and not prompt_ids:
        raise ProtocolError(BAD_VALUE, "field 'prompt_ids' must not be empty (empty prompt)",
                            "prompt_ids", rid)
    if text is not None and not text:
        raise ProtocolError(BAD_VALUE, "field 'text' must not be empty (empty prompt)", "text",
                            rid)
    max_new = f.get("max_new_tokens", int, 32)
    if max_new < 1:
        raise ProtocolError(BAD_VALUE, f"field 'max_new_tokens' must be >= 1, got {max_new}",
                            "max_new_tokens", rid)
    # Wire types here; the bounds are SamplingParams' (one owner, one message).
    temperature = f.number("temperature", 0.0)
    top_k = f.get("top_k", int, 0)
    top_p = f.number("top_p", 1.0)
    seed = f.get("seed", int)
    stop_ids = f.int_list("stop_ids")
    stream = f.get("stream", bool, False)
    try:
        sampling = SamplingParams(temperature, top_k, top_p, seed).validate()
        stop_ids = check_stop_ids(stop_ids)
        stop = validate_stop(f.str_list("stop"))  # the bounds are hybridgraph.text's
    except RequestError as e:
        raise ProtocolError(BAD_VALUE, str(e), e.field, rid) from None
    return GenerateRequest(rid, prompt_ids, text, max_new, sampling, stop_ids, stream,
                           messages, stop, f.get("ignore_eos", bool, False))


class _Fields:
    """Typed access to optional fields; nil counts as absent."""

    def __init__(self, msg: dict[str, Any], rid: RequestId) -> None:
        self.msg, self.rid = msg, rid

    def get(self, name: str, typ: type, default: Any = None) -> Any:
        v = self.msg.get(name)
        if v is None:
            return default
        # bool is an int subclass in Python, but not on the wire.
        if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
            raise ProtocolError(BAD_TYPE, f"field {name!r} must be {typ.__name__}, got "
                                          f"{_type_name(v)}", name, self.rid)
        return v

    def number(self, name: str, default: float) -> float:
        v = self.msg.get(name)
        if v is None:
            return default
        if not isinstance(v, int | float) or isinstance(v, bool):
            raise ProtocolError(BAD_TYPE, f"field {name!r} must be a number, got "
                                          f"{_type_name(v)}", name, self.rid)
        return float(v)

    def int_list(self, name: str, required: bool = False,
                 lo: int = -2**63) -> list[int] | None:
        v = self.msg.get(name)
        if v is None:
            if required:
                raise ProtocolError(MISSING_FIELD, f"missing field {name!r}", name, self.rid)
            return None
        if not isinstance(v, list):
            raise ProtocolError(BAD_TYPE, f"field {name!r} must be a list of integers, got "
                                          f"{_type_name(v)}", name, self.rid)
        if len(v) > MAX_LIST_LEN:
            raise ProtocolError(BAD_VALUE, f"field {name!r} has {len(v)} items; at most "
                                           f"{MAX_LIST_LEN}", name, self.rid)
        for i, x in enumerate(v):
            if not isinstance(x, int) or isinstance(x, bool):
                raise ProtocolError(BAD_TYPE, f"field {name!r}[{i}] must be an integer, got "
                                              f"{_type_name(x)}", name, self.rid)
            if not lo <= x < 2**63:
                raise ProtocolError(BAD_VALUE, f"field {name!r}[{i}] = {x} is out of range",
                                    name, self.rid)
        return v

    def _list(self, name: str, of: str) -> list[Any] | None:
        """The field as a list of at most MAX_LIST_LEN items (`of` names them in the error);
        None if absent. The caller checks the items."""
        v = self.msg.get(name)
        if v is None:
            return None
        if not isinstance(v, list) or len(v) > MAX_LIST_LEN:
            raise ProtocolError(BAD_TYPE, f"field {name!r} must be a list of {of}, got "
                                          f"{_type_name(v)}", name, self.rid)
        return v

    # issue 11. Wire types only: how many messages a request may carry is the model
    # layer's bound (model.chat), checked when the request is admitted.
    def str_list(self, name: str) -> list[str] | None:
        v = self._list(name, "strings")
        for i, x in enumerate(v or ()):
            if not isinstance(x, str):
                raise ProtocolError(BAD_TYPE, f"field {name!r}[{i}] must be a string, got "
                                              f"{_type_name(x)}", name, self.rid)
        return v

    def messages(self, name: str) -> list[dict[str, str]] | None:
        v = self._list(name, "maps")
        for i, m in enumerate(v or ()):
            if not isinstance(m, dict) or set(m) != {"role", "content"} or \
                    not all(isinstance(x, str) for x in m.values()):
                raise ProtocolError(BAD_TYPE, f"field {name!r}[{i}] must be a map of exactly "
                                              "'role' and 'content', both strings", name, self.rid)
        return v


def _request_id(msg: dict[str, Any], name: str, rid: RequestId | None = None) -> RequestId:
    if name not in msg:
        raise ProtocolError(MISSING_FIELD, f"missing field {name!r}", name, rid)
    v = msg[name]
    if isinstance(v, int) and not isinstance(v, bool) and -2**63 <= v < 2**64:
        return v
    if isinstance(v, str) and 0 < len(v) <= MAX_REQUEST_ID_LEN:
        return v
    raise ProtocolError(BAD_TYPE, f"field {name!r} must be an integer or a string of 1 to "
                                  f"{MAX_REQUEST_ID_LEN} characters, got {_type_name(v)}",
                        name, rid)


def _type_name(v: Any) -> str:
    return {dict: "map", list: "array", str: "string", bytes: "binary", bool: "boolean",
            int: "integer", float: "float", type(None): "nil"}.get(type(v), type(v).__name__)
