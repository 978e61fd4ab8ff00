"""OpenAI request bodies: strict parsing, errors that name the field, response shapes."""

from __future__ import annotations

import json

import pytest

from hybridgraph.server.openai_schema import (
    BadRequest,
    ChatRequest,
    CompletionRequest,
    Shapes,
    parse,
)


def body(**kw) -> bytes:
    return json.dumps({"model": "m", "prompt": "hi", **kw}).encode()


def refused(raw: bytes, model: type = CompletionRequest) -> BadRequest:
    with pytest.raises(BadRequest) as e:
        parse(model, raw).check_supported()
    return e.value


def test_defaults_follow_openai() -> None:
    r = parse(CompletionRequest, body())
    assert (r.temperature, r.top_p, r.n, r.stream) == (1.0, 1.0, 1, False)
    assert r.max_new_tokens() == (16, "max_tokens")
    assert r.one_prompt() == "hi"
    assert parse(CompletionRequest, body(prompt=[[1, 2]])).one_prompt() == [1, 2]


@pytest.mark.parametrize("raw,param,words", [
    (body(foo=1, bar=2), "foo", "'foo', 'bar'"),
    (body(temperature="0.5"), "temperature", "temperature"),
    (b'{"model": "m", "prompt": "x", "temperature": NaN}', "temperature", "finite"),
    (body(max_tokens=1.5), "max_tokens", "integer"),
    (body(stream=1), "stream", "boolean"),
    (body(prompt=3), "prompt", "a string, a list of token ids"),
    (body(stop=[1]), "stop", "a string or a list of strings"),
    (b'{"prompt": "x"}', "model", "required"),
    (b"{", None, "not valid JSON"),
    (b'"text"', None, "JSON object"),
    (body(n=3), "n", "n=1"),
    (body(presence_penalty=0.5), "presence_penalty", "only 0"),
    (body(echo=True), "echo", "echo"),
    (body(logprobs=2), "logprobs", "logprobs"),
    (body(stream_options={"include_usage": True}), "stream_options", "stream"),
    (body(stream=True, stream_options={"extra": 1}), "stream_options.extra", "unknown"),
])
def test_refusals_name_the_field(raw: bytes, param: str | None, words: str) -> None:
    e = refused(raw)
    assert e.param == param
    assert words in e.message, e.message


def test_neutral_values_of_unsupported_fields_are_accepted() -> None:
    parse(CompletionRequest, body(n=1, presence_penalty=0, frequency_penalty=0.0,
                                  echo=False, logprobs=None, user="u")).check_supported()


def test_several_prompts_are_refused() -> None:
    with pytest.raises(BadRequest, match="2 prompts") as e:
        parse(CompletionRequest, body(prompt=["a", "b"])).one_prompt()
    assert e.value.param == "prompt"


def test_chat_messages() -> None:
    raw = json.dumps({"model": "m", "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text",
                                                                     "text": "b"}]}]})
    r = parse(ChatRequest, raw.encode())
    assert [m.as_template_input()["content"] for m in r.messages] == ["be brief", "ab"]
    assert r.max_new_tokens() == (None, "max_tokens")
    e = refused(json.dumps({"model": "m", "messages": []}).encode(), ChatRequest)
    assert e.param == "messages"
    e = refused(json.dumps({"model": "m", "messages": [{"role": "robot", "content": "x"}]})
                .encode(), ChatRequest)
    assert e.param == "messages" and "role" in e.message
    e = refused(json.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}],
                            "max_tokens": 3, "max_completion_tokens": 4}).encode(), ChatRequest)
    assert e.param == "max_completion_tokens"


def test_shapes() -> None:
    s = Shapes("cmpl-1", "m", chat=False)
    r = s.response("hi", [5, 6], "length", 3)
    assert r["object"] == "text_completion" and r["choices"][0]["text"] == "hi"
    assert r["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    c = Shapes("chatcmpl-1", "m", chat=True)
    assert c.response("hi", [5], "stop", 1)["choices"][0]["message"] == {
        "role": "assistant", "content": "hi"}
    assert c.chunk("", [], None, role=True)["choices"][0]["delta"] == {"role": "assistant",
                                                                      "content": ""}
    assert c.chunk("x", [7], None)["object"] == "chat.completion.chunk"
    assert c.usage_chunk(1, 2)["choices"] == []
