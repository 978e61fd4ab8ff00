"""Chat templates: where they come from, how they render, what they refuse."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hybridgraph.model.chat import (
    MAX_MESSAGES,
    ChatTemplate,
    ChatTemplateError,
    find_chat_template,
    validate_messages,
)
from hybridgraph.request import RequestError

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
          "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|im_start|>assistant\n' }}{% endif %}")
HI = [{"role": "user", "content": "hi"}]


def test_renders_a_chatml_template() -> None:
    t = ChatTemplate(CHATML, "test")
    assert t.render(HI) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert t.render(HI, add_generation_prompt=False) == "<|im_start|>user\nhi<|im_end|>\n"


def test_bos_token_and_tojson_are_available() -> None:
    t = ChatTemplate("{{ bos_token }}{{ messages | tojson }}", "test")
    assert t.render(HI, bos_token="<s>") == '<s>[{"role": "user", "content": "hi"}]'


def test_a_template_that_raises_is_named() -> None:
    t = ChatTemplate("{{ raise_exception('roles must alternate') }}", "tokenizer_config.json")
    with pytest.raises(RequestError, match="tokenizer_config.json.*roles must alternate") as info:
        t.render(HI)
    assert info.value.field == "messages"


def test_the_sandbox_refuses_internals() -> None:
    t = ChatTemplate("{{ ''.__class__.__mro__[1].__subclasses__() }}", "evil")
    with pytest.raises(RequestError, match="evil"):
        t.render(HI)


def test_a_template_that_does_not_compile_is_named() -> None:
    with pytest.raises(ChatTemplateError, match="from x.jinja does not compile"):
        ChatTemplate("{% for %}", "x.jinja")


@pytest.mark.parametrize("messages, field", [
    ([], "messages"),
    ("hi", "messages"),
    ([{"role": "user"}], "messages[0].content"),
    ([{"role": "", "content": "x"}], "messages[0].role"),
    ([{"role": "user", "content": "x", "name": "y"}], "messages[0]"),
    ([{"role": "user", "content": 3}], "messages[0].content"),
])
def test_bad_messages_are_named(messages, field: str) -> None:
    with pytest.raises(RequestError) as info:
        validate_messages(messages)
    assert info.value.field == field


def test_an_oversized_messages_list_is_refused() -> None:
    with pytest.raises(RequestError, match=f"{MAX_MESSAGES + 1} messages; at most {MAX_MESSAGES}"):
        validate_messages(HI * (MAX_MESSAGES + 1))
    with pytest.raises(RequestError, match="contents exceed"):
        validate_messages([{"role": "user", "content": "x" * (1 << 20)}] * 2)


def test_template_sources_in_order(tmp_path: Path) -> None:
    assert find_chat_template(tmp_path) is None
    assert find_chat_template(tmp_path, embedded="gguf {{ 1 }}").origin == "the GGUF metadata"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "cfg"}))
    assert find_chat_template(tmp_path, embedded="gguf").source == "cfg"
    (tmp_path / "chat_template.jinja").write_text("jinja file")
    assert find_chat_template(tmp_path).source == "jinja file"
    assert find_chat_template(tmp_path, override="inline {{ 1 }}").source == "inline {{ 1 }}"
    (tmp_path / "mine.jinja").write_text("mine")
    assert find_chat_template(tmp_path, override=str(tmp_path / "mine.jinja")).source == "mine"
    with pytest.raises(ChatTemplateError, match="neither a file nor a template"):
        find_chat_template(tmp_path, override=str(tmp_path / "missing.jinja"))


def test_named_templates_use_the_default_one(tmp_path: Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [
        {"name": "tool_use", "template": "tools"}, {"name": "default", "template": "plain"}]}))
    assert find_chat_template(tmp_path).source == "plain"
