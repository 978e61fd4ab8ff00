"""Chat templates: a checkpoint's Jinja2 template, rendered in a sandbox.

A template comes from (first found) an explicit override (`--chat-template`: a file or the
template text), chat_template.jinja, tokenizer_config.json's chat_template, or a GGUF file's
tokenizer.chat_template. Templates are code shipped with a download: they run in Jinja2's
ImmutableSandboxedEnvironment, which refuses attribute access to internals and mutation.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from hybridgraph.request import RequestError

MAX_MESSAGES = 256           # per conversation
MAX_CHAT_CHARS = 1 << 20     # all contents together
MAX_ROLE_CHARS = 64


class ChatTemplateError(ValueError):
    """A template that cannot be found or does not compile (names its source)."""


def validate_messages(messages: Any) -> list[dict[str, str]]:
    """[{role, content}] with string fields and bounded size; RequestError names the item."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages", "must be a non-empty list of {role, content} maps")
    if len(messages) > MAX_MESSAGES:
        raise RequestError("messages", f"{len(messages)} messages; at most {MAX_MESSAGES}")
    total = 0
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or set(m) - {"role", "content"}:
            raise RequestError(f"messages[{i}]", "must be a map with exactly the keys "
                                                 "role and content")
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or not 0 < len(role) <= MAX_ROLE_CHARS:
            raise RequestError(f"messages[{i}].role",
                               f"must be a string of 1 to {MAX_ROLE_CHARS} characters")
        if not isinstance(content, str):
            raise RequestError(f"messages[{i}].content", "must be a string")
        total += len(content)
        if total > MAX_CHAT_CHARS:
            raise RequestError("messages", f"contents exceed {MAX_CHAT_CHARS} characters")
        out.append({"role": role, "content": content})
    return out


def _raise(message: str) -> None:
    # Templates call raise_exception("...") to refuse a conversation (e.g. roles that do
    # not alternate); the message is the template author's.
    raise ValueError(message)


class ChatTemplate:
    def __init__(self, source: str, origin: str) -> None:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        self.source, self.origin = source, origin
        # trim/lstrip as transformers renders them, so the same template gives the same text.
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda v, indent=None, **_: json.dumps(
            v, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(source)
        except TemplateError as e:
            raise ChatTemplateError(f"chat template from {origin} does not compile: {e}") from None

    def render(self, messages: Any, *, add_generation_prompt: bool = True,
               bos_token: str = "", eos_token: str = "") -> str:
        msgs = validate_messages(messages)
        try:
            return self._template.render(messages=msgs, add_generation_prompt=add_generation_prompt,
                                         bos_token=bos_token, eos_token=eos_token)
        except Exception as e:  # a template may raise anything; the request fails, not us
            raise RequestError("messages", f"the chat template ({self.origin}) refused these "
                                           f"messages: {type(e).__name__}: {e}") from None


def _from_tokenizer_config(path: Path) -> str | None:
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ChatTemplateError(f"cannot read {path}: {e}") from None
    t = d.get("chat_template") if isinstance(d, dict) else None
    if isinstance(t, list):  # [{name, template}]: the "default" one is the chat template
        named = {x.get("name"): x.get("template") for x in t if isinstance(x, dict)}
        t = named.get("default")
    return t if isinstance(t, str) and t else None


def find_chat_template(model_dir: str | Path | None, embedded: str | None = None,
                       override: str | None = None) -> ChatTemplate | None:
    """The template that applies to a checkpoint, compiled; None when it has none."""
    if override:
        p = Path(override)
        if "{" not in override and p.is_file():
            return ChatTemplate(p.read_text(), str(p))
        if "{" not in override:
            raise ChatTemplateError(f"--chat-template {override!r} is neither a file nor a "
                                    "template")
        return ChatTemplate(override, "--chat-template")
    if model_dir is not None:
        d = Path(model_dir)
        if (d / "chat_template.jinja").is_file():
            return ChatTemplate((d / "chat_template.jinja").read_text(),
                                str(d / "chat_template.jinja"))
        if (d / "tokenizer_config.json").is_file():
            t = _from_tokenizer_config(d / "tokenizer_config.json")
            if t is not None:
                return ChatTemplate(t, str(d / "tokenizer_config.json"))
    if embedded:
        return ChatTemplate(embedded, "the GGUF metadata")
    return None


def chat_prompt_ids(tokenizer: Any, messages: Any) -> list[int]:
    """The ids of `messages` rendered by the tokenizer's chat template, ready for the
    assistant's turn. Special tokens are in the rendered text already (the template writes
    BOS where the model wants it), so none are added."""
    validate_messages(messages)  # an oversized list is refused before anything else
    template = tokenizer.chat_template
    if template is None:
        raise RequestError("messages", "this model has no chat template; pass --chat-template "
                                       "(a .jinja file or the template text)")
    text = template.render(messages, bos_token=tokenizer.bos_token,
                           eos_token=tokenizer.eos_token)
    return tokenizer.encode(text, add_special_tokens=False)
