"""Wire protocol: framing, decoding and request validation (no server, no torch)."""

from __future__ import annotations

import asyncio
import pickle
import socket
import struct
from typing import Any

import msgpack
import pytest

from hybridgraph.server import protocol as P


def gen(**fields: Any) -> dict[str, Any]:
    return {"type": "generate", "request_id": 7, "prompt_ids": [1, 2, 3], **fields}


def refused(msg: dict[str, Any]) -> P.ProtocolError:
    with pytest.raises(P.ProtocolError) as e:
        P.parse_request(msg)
    return e.value


def test_frame_round_trip() -> None:
    msg = {"type": "status", "request_id": "abc", "nested": {"x": [1, 2.5, None, True]}}
    frame = P.encode_frame(msg)
    (n,) = struct.unpack(">I", frame[:4])
    assert n == len(frame) - 4
    assert P.decode_body(frame[4:]) == msg


def test_frame_length_checked_before_body() -> None:
    assert P.frame_length(struct.pack(">I", 100), 100) == 100
    with pytest.raises(P.ProtocolError) as e:
        P.frame_length(struct.pack(">I", 101), 100)
    assert e.value.code == P.FRAME_TOO_LARGE and e.value.fatal and "101" in e.value.message
    with pytest.raises(P.ProtocolError) as e:
        P.frame_length(struct.pack(">I", 0), 100)
    assert e.value.code == P.MALFORMED


@pytest.mark.parametrize("body", [
    b"\xc1",                                                # a byte MessagePack never uses
    b"\x81\xa4type",                                        # a map cut short
    msgpack.packb({"type": "status"}) + b"\x01",            # trailing bytes
    pickle.dumps({"type": "status", "request_id": 1}),      # pickle is not MessagePack
    b"\xa2\xff\xfe",                                        # a string that isn't UTF-8
], ids=["reserved-byte", "short-map", "trailing", "pickle", "bad-utf8"])
def test_non_msgpack_bodies_are_malformed(body: bytes) -> None:
    with pytest.raises(P.ProtocolError) as e:
        P.decode_body(body)
    assert e.value.code == P.MALFORMED and not e.value.fatal


def test_body_must_be_a_map_with_string_keys() -> None:
    for value in ([1, 2], "status", 3):
        with pytest.raises(P.ProtocolError, match="map"):
            P.decode_body(msgpack.packb(value))
    with pytest.raises(P.ProtocolError, match="key"):
        P.decode_body(msgpack.packb({1: "x"}))
    with pytest.raises(P.ProtocolError, match="key"):
        P.decode_body(msgpack.packb({b"type": "status"}, use_bin_type=True))


def test_parse_generate_defaults_and_fields() -> None:
    r = P.parse_request(gen())
    assert isinstance(r, P.GenerateRequest)
    assert (r.request_id, r.prompt_ids, r.text, r.max_new_tokens, r.stream) == \
        (7, [1, 2, 3], None, 32, False)
    r = P.parse_request({"type": "generate", "request_id": "x", "text": "hi", "temperature": 1,
                         "top_k": 5, "top_p": 0.5, "seed": 3, "stop_ids": [2], "stream": True,
                         "max_new_tokens": 4})
    sp = r.sampling
    assert (r.text, sp.temperature, sp.top_k, sp.top_p, sp.seed, r.stop_ids, r.stream) == \
        ("hi", 1.0, 5, 0.5, 3, [2], True)
    assert isinstance(sp.temperature, float)
    assert P.parse_request(gen(top_k=-1)).sampling.top_k == 0  # -1 is "off", as 0


@pytest.mark.parametrize("msg, code, field", [
    ({"type": "status"}, P.MISSING_FIELD, "request_id"),
    ({"request_id": 1}, P.MISSING_FIELD, "type"),
    ({"type": 5, "request_id": 1}, P.BAD_TYPE, "type"),
    ({"type": "explode", "request_id": 1}, P.UNKNOWN_TYPE, "type"),
    ({"type": "status", "request_id": [1]}, P.BAD_TYPE, "request_id"),
    ({"type": "status", "request_id": True}, P.BAD_TYPE, "request_id"),
    ({"type": "status", "request_id": ""}, P.BAD_TYPE, "request_id"),
    ({"type": "status", "request_id": 1, "extra": 1}, P.UNKNOWN_FIELD, "extra"),
    ({"type": "generate", "request_id": 1}, P.MISSING_FIELD, "prompt_ids"),
    (gen(text="hi"), P.BAD_VALUE, "text"),
    (gen(prompt_ids="1 2 3"), P.BAD_TYPE, "prompt_ids"),
    (gen(prompt_ids=[1, "2"]), P.BAD_TYPE, "prompt_ids"),
    (gen(prompt_ids=[1, True]), P.BAD_TYPE, "prompt_ids"),
    (gen(prompt_ids=[1, 2.0]), P.BAD_TYPE, "prompt_ids"),
    (gen(prompt_ids=[1, -4]), P.BAD_VALUE, "prompt_ids"),
    (gen(prompt_ids=[]), P.BAD_VALUE, "prompt_ids"),
    ({"type": "generate", "request_id": 1, "text": ""}, P.BAD_VALUE, "text"),
    ({"type": "generate", "request_id": 1, "text": b"hi"}, P.BAD_TYPE, "text"),
    (gen(max_new_tokens="5"), P.BAD_TYPE, "max_new_tokens"),
    (gen(max_new_tokens=2.0), P.BAD_TYPE, "max_new_tokens"),
    (gen(max_new_tokens=0), P.BAD_VALUE, "max_new_tokens"),
    (gen(max_new_tokens=-3), P.BAD_VALUE, "max_new_tokens"),
    (gen(temperature="hot"), P.BAD_TYPE, "temperature"),
    (gen(temperature=-1.0), P.BAD_VALUE, "temperature"),
    (gen(temperature=float("nan")), P.BAD_VALUE, "temperature"),
    (gen(temperature=float("inf")), P.BAD_VALUE, "temperature"),
    (gen(temperature=True), P.BAD_TYPE, "temperature"),
    (gen(top_k=-2), P.BAD_VALUE, "top_k"),
    (gen(top_k=2**40), P.BAD_VALUE, "top_k"),
    (gen(top_k=1.0), P.BAD_TYPE, "top_k"),
    (gen(stop_ids=[2, -1]), P.BAD_VALUE, "stop_ids"),
    (gen(stop_ids=[2, "3"]), P.BAD_TYPE, "stop_ids"),
    ({"type": "capture", "request_id": 1, "lengths": list(range(1, P.MAX_CAPTURE_LENGTHS + 2))},
     P.BAD_VALUE, "lengths"),
    (gen(top_p=0.0), P.BAD_VALUE, "top_p"),
    (gen(top_p=1.5), P.BAD_VALUE, "top_p"),
    (gen(seed=-1), P.BAD_VALUE, "seed"),
    (gen(stream=1), P.BAD_TYPE, "stream"),
    (gen(stop_ids=2), P.BAD_TYPE, "stop_ids"),
    ({"type": "capture", "request_id": 1}, P.MISSING_FIELD, "lengths"),
    ({"type": "capture", "request_id": 1, "lengths": []}, P.BAD_VALUE, "lengths"),
    ({"type": "capture", "request_id": 1, "lengths": [0]}, P.BAD_VALUE, "lengths"),
    ({"type": "cancel", "request_id": 1}, P.MISSING_FIELD, "target"),
    ({"type": "cancel", "request_id": 1, "target": 1.5}, P.BAD_TYPE, "target"),
])
def test_bad_requests_name_the_field(msg: dict[str, Any], code: str, field: str) -> None:
    e = refused(msg)
    assert (e.code, e.field) == (code, field), e
    assert field in e.message
    reply = e.reply()
    assert reply["type"] == "error" and reply["code"] == code and reply["field"] == field
    if "request_id" in msg and field != "request_id":
        assert reply["request_id"] == msg["request_id"]  # errors echo the id when they can


def test_other_request_types() -> None:
    assert P.parse_request({"type": "status", "request_id": 1}) == P.StatusRequest(1)
    assert P.parse_request({"type": "shutdown", "request_id": 2}) == P.ShutdownRequest(2)
    assert P.parse_request({"type": "cancel", "request_id": 3, "target": "a"}) == \
        P.CancelRequest(3, "a")
    assert P.parse_request({"type": "capture", "request_id": 4, "lengths": [8, 16]}) == \
        P.CaptureRequest(4, [8, 16])


def test_blocking_and_async_readers() -> None:
    a, b = socket.socketpair()
    with a, b:
        a.sendall(P.encode_frame({"x": 1}) + P.encode_frame({"y": 2}))
        assert P.recv_frame(b, 100) == {"x": 1}
        assert P.recv_frame(b, 100) == {"y": 2}
        a.sendall(struct.pack(">I", 1000))
        with pytest.raises(P.ProtocolError):
            P.recv_frame(b, 100)
        a.close()
        assert P.recv_frame(b, 100) is None

    async def read_all(data: bytes) -> list[Any]:
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        out = []
        while True:
            try:
                m = await P.read_frame(reader, 100)
            except ConnectionError as e:
                out.append(e)
                return out
            if m is None:
                return out
            out.append(m)

    frame = P.encode_frame({"z": 3})
    assert asyncio.run(read_all(frame * 2)) == [{"z": 3}, {"z": 3}]
    got = asyncio.run(read_all(frame + frame[:5]))
    assert got[0] == {"z": 3} and isinstance(got[1], ConnectionError)


def test_sampling_bounds_have_one_owner() -> None:
    """The protocol's message for a bad sampling value is SamplingParams' own."""
    from hybridgraph.request import RequestError, SamplingParams

    for field, value in [("top_k", 2**40), ("top_p", 1.5), ("temperature", float("nan")),
                         ("seed", 2**63)]:
        with pytest.raises(RequestError) as local:
            SamplingParams(**{field: value}).validate()
        assert refused(gen(**{field: value})).message == str(local.value)
