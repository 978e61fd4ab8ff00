"""The wire's text fields (issue 11): messages, stop strings, ignore_eos."""

from __future__ import annotations

from typing import Any

import pytest

from hybridgraph.server import protocol as P
from hybridgraph.text import MAX_STOP_STRINGS

HI = [{"role": "user", "content": "hi"}]


def msg(**fields: Any) -> dict[str, Any]:
    return {"type": "generate", "request_id": 9, **fields}


def test_messages_stop_and_ignore_eos_parse() -> None:
    r = P.parse_request(msg(messages=HI, stop=["\n\n", "User:"], ignore_eos=True))
    assert (r.messages, r.stop, r.ignore_eos, r.prompt_ids, r.text) == \
        (HI, ("\n\n", "User:"), True, None, None)
    r = P.parse_request(msg(text="hi"))
    assert (r.messages, r.stop, r.ignore_eos) == (None, (), False)


@pytest.mark.parametrize("fields, code, field", [
    ({"messages": HI, "text": "hi"}, P.BAD_VALUE, "messages"),
    ({"messages": HI, "prompt_ids": [1]}, P.BAD_VALUE, "messages"),
    ({"messages": "hi"}, P.BAD_TYPE, "messages"),
    ({"messages": [{"role": "user"}]}, P.BAD_TYPE, "messages"),
    ({"messages": [{"role": "user", "content": 3}]}, P.BAD_TYPE, "messages"),
    ({"messages": [{"role": "user", "content": "x", "extra": "y"}]}, P.BAD_TYPE, "messages"),
    ({"text": "hi", "stop": "User:"}, P.BAD_TYPE, "stop"),
    ({"text": "hi", "stop": ["ok", 5]}, P.BAD_TYPE, "stop"),
    ({"text": "hi", "ignore_eos": 1}, P.BAD_TYPE, "ignore_eos"),
    # The bounds are hybridgraph.text's, checked as the request is parsed.
    ({"text": "hi", "stop": ["s"] * (MAX_STOP_STRINGS + 1)}, P.BAD_VALUE, "stop"),
    ({"text": "hi", "stop": [""]}, P.BAD_VALUE, "stop"),
])
def test_bad_text_fields_are_named(fields: dict[str, Any], code: str, field: str) -> None:
    with pytest.raises(P.ProtocolError) as e:
        P.parse_request(msg(**fields))
    assert (e.value.code, e.value.field) == (code, field), e.value
    assert field in e.value.message
