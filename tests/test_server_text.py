"""Text through the server (issue 11): chat messages, stop strings, streamed text deltas.

A tiny random-weight server with a chat template given on its command line; its output is
bytes, so multi-byte characters are split across tokens all the time.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest

from hybridgraph.model.chat import MAX_MESSAGES
from hybridgraph.server.client import Client, ServerError
from hybridgraph.server.launch import ServerProcess
from hybridgraph.text import MAX_STOP_STRINGS

TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
HI = [{"role": "user", "content": "Bonjour ☕ café"}]


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    d = tempfile.mkdtemp(prefix="hgt", dir="/tmp")
    try:
        with ServerProcess(os.path.join(d, "t.sock"), "tiny",
                           ["--device", "cpu", "--chat-template", TEMPLATE]) as srv:
            yield srv
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_messages_go_through_the_template(server: ServerProcess) -> None:
    with Client(server.socket_path, timeout=60) as c:
        by_messages = c.generate(messages=HI, max_new_tokens=8, ignore_eos=True)
        by_text = c.generate(text="<user>Bonjour ☕ café", max_new_tokens=8, ignore_eos=True)
    # The template writes no BOS; the text path's byte tokenizer adds one.
    assert by_messages["prompt_len"] == by_text["prompt_len"] - 1


def test_streamed_text_deltas_join_to_the_result_text(server: ServerProcess) -> None:
    deltas: list[str] = []
    with Client(server.socket_path, timeout=60) as c:
        reply = c.generate(messages=HI, max_new_tokens=48, ignore_eos=True,
                           on_text=deltas.append)
    assert len(deltas) == len(reply["tokens"])
    assert "".join(deltas) == reply["text"]


def test_a_stop_string_ends_the_reply_and_is_left_out(server: ServerProcess) -> None:
    with Client(server.socket_path, timeout=60) as c:
        free = c.generate(messages=HI, max_new_tokens=48, ignore_eos=True)["text"]
        stop = free[10:13]
        reply = c.generate(messages=HI, max_new_tokens=48, ignore_eos=True, stop=[stop])
    assert reply["finish_reason"] == "stop"
    assert reply["text"] == free[:free.find(stop)]


@pytest.mark.parametrize("kwargs, field, words", [
    ({"messages": HI * (MAX_MESSAGES + 1)}, "messages", f"at most {MAX_MESSAGES}"),
    ({"messages": HI, "stop": ["x"] * (MAX_STOP_STRINGS + 1)}, "stop",
     f"at most {MAX_STOP_STRINGS}"),
    ({"messages": [{"role": "", "content": "x"}]}, "messages", "role"),
])
def test_bad_text_requests_are_named(server: ServerProcess, kwargs, field: str,
                                     words: str) -> None:
    with Client(server.socket_path, timeout=60) as c:
        with pytest.raises(ServerError) as e:
            c.generate(max_new_tokens=4, **kwargs)
        assert e.value.field == field and words in e.value.message
        assert c.generate(messages=HI, max_new_tokens=2)["tokens"]  # still serving


def test_async_client_streams_text_too(server: ServerProcess) -> None:
    import asyncio

    from hybridgraph.server.async_client import AsyncClient

    async def go() -> tuple[list[str], dict]:
        deltas: list[str] = []
        async with AsyncClient(server.socket_path) as c:
            reply = await c.generate(messages=HI, max_new_tokens=24, ignore_eos=True,
                                     on_text=deltas.append)
        return deltas, reply

    deltas, reply = asyncio.run(go())
    assert len(deltas) == len(reply["tokens"]) and "".join(deltas) == reply["text"]
