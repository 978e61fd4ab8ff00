"""The OpenAI API's request bodies (pydantic, strict) and response shapes (plain dicts).

Requests are strict: an unknown field, a string where a number goes, NaN, a second prompt
are refused with an error naming the field, never ignored. A few OpenAI fields are
accepted only at the value that asks for nothing (`n: 1`, penalties 0, `echo: false`), so
clients that send defaults work and clients that want those features hear that they
can't have them. Sampling bounds are not repeated here: the engine's SamplingParams and
validate() own them, and the server maps their field names back to the API's.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions


class BadRequest(ValueError):
    """A request the API refuses; `param` names the field (None: the body as a whole)."""

    def __init__(self, param: str | None, message: str, code: str = "invalid_value") -> None:
        super().__init__(message)
        self.param, self.message, self.code = param, message, code


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Generation(_Strict):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                          # extension (as vLLM): 0 keeps every token
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None  # extension (as vLLM)
    ignore_eos: bool = False                 # extension (as vLLM)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: str | None = None                 # metadata only: changes nothing generated

    def check_supported(self) -> None:
        if self.n != 1:
            raise BadRequest("n", f"n={self.n}: only n=1 is supported", "unsupported")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) != 0:
                raise BadRequest(name, f"{name} is not supported (only 0)", "unsupported")
        if self.stream_options is not None and not self.stream:
            raise BadRequest("stream_options", "stream_options is only allowed with stream: true")

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def stop_strings(self) -> list[str] | None:
        """As a list (the engine's text.validate_stop owns how many and how long)."""
        return [self.stop] if isinstance(self.stop, str) else self.stop


class CompletionRequest(_Generation):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo:
            raise BadRequest("echo", "echo is not supported", "unsupported")
        if self.logprobs is not None:
            raise BadRequest("logprobs", "logprobs is not supported", "unsupported")
        if self.suffix:
            raise BadRequest("suffix", "suffix is not supported", "unsupported")

    def one_prompt(self) -> str | list[int]:
        """The prompt as text or ids; a list of several prompts is refused (n=1, no batch)."""
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], str | list):
            if len(p) != 1:
                raise BadRequest("prompt", f"{len(p)} prompts in one request; send one",
                                 "unsupported")
            p = p[0]
        if not p:
            raise BadRequest("prompt", "the prompt is empty")
        return p  # type: ignore[return-value]

    def max_new_tokens(self) -> tuple[int, str]:
        return (self.max_tokens or DEFAULT_COMPLETION_TOKENS), "max_tokens"


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def as_template_input(self) -> dict[str, str]:
        c = self.content
        return {"role": self.role, "content": c if isinstance(c, str) else
                "".join(p.text for p in c)}


class ChatRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False

    def check_supported(self) -> None:
        super().check_supported()
        if self.logprobs:
            raise BadRequest("logprobs", "logprobs is not supported", "unsupported")
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise BadRequest("max_completion_tokens", "give max_completion_tokens or "
                                                      "max_tokens, not both")

    def max_new_tokens(self) -> tuple[int | None, str]:
        """(tokens asked for, the field that asked); None: as many as the cache has room."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"


_UNIONS = {"prompt": "a string, a list of token ids, or a list holding one of those",
           "stop": "a string or a list of strings"}


def parse(model: type[BaseModel], body: bytes) -> Any:
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        raise describe(e) from None


def describe(e: ValidationError) -> BadRequest:
    """pydantic's errors -> one BadRequest that names the fields (all unknown ones at once)."""
    errors = e.errors(include_url=False)
    unknown = [".".join(map(str, err["loc"])) for err in errors
               if err["type"] == "extra_forbidden"]
    if unknown:
        names = ", ".join(repr(u) for u in unknown)
        return BadRequest(unknown[0], f"unknown field{'s' if len(unknown) > 1 else ''} "
                                      f"{names} (not supported by this server)", "unknown_field")
    err = errors[0]
    if err["type"] == "json_invalid":
        return BadRequest(None, f"the body is not valid JSON: {err['msg']}", "invalid_json")
    loc = [str(x) for x in err["loc"]]
    if not loc:
        return BadRequest(None, f"the body must be a JSON object: {err['msg']}", "invalid_type")
    # A union's errors carry the member in the location (prompt.str, prompt.list[int].0):
    # name the field the client wrote.
    param = loc[0]
    if param in _UNIONS:  # a value no member of the union took
        return BadRequest(param, f"field '{param}' must be {_UNIONS[param]}", "invalid_type")
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    where = ".".join(x for x in loc if "[" not in x and x not in ("str", "int", "float",
                                                                  "bool"))
    kind = "missing_field" if err["type"] == "missing" else "invalid_type"
    return BadRequest(param, f"field '{where}': {err['msg']}{more}", kind)


# ----------------------------------------------------------------------- responses

def error_body(message: str, param: str | None, code: str,
               kind: str = "invalid_request_error") -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class Shapes:
    """Response and chunk bodies of one request (completion or chat)."""

    def __init__(self, rid: str, model: str, chat: bool) -> None:
        self.rid, self.model, self.chat = rid, model, chat
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.rid, "object": obj, "created": self.created, "model": self.model}

    def response(self, text: str, token_ids: list[int], finish: str,
                 prompt_tokens: int) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None,
                                  "token_ids": token_ids}  # token_ids: an extension
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return {**self._head(self.object), "choices": [choice],
                "usage": usage(prompt_tokens, len(token_ids))}

    def chunk(self, text: str | None, token_ids: list[int], finish: str | None,
              role: bool = False) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None,
                                  "token_ids": token_ids}
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            choice["delta"] = delta
        else:
            choice["text"] = text or ""
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._head(obj), "choices": [choice]}

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._head(obj), "choices": [], "usage": usage(prompt_tokens,
                                                                 completion_tokens)}
