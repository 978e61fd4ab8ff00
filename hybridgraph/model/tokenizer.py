"""Tokenizers: a model's tokenizer (tokenizer.json or a GGUF file's), or a byte-level one
for presets with random weights.

Token ids are first-class everywhere else (server, benchmarks); text is a convenience.
"""

from __future__ import annotations

import codecs
from pathlib import Path
from typing import Any, Protocol

from hybridgraph.model.chat import ChatTemplate


class TokenizerError(ValueError):
    """A model without a usable tokenizer (the message says where one was looked for)."""


class StreamDecoder(Protocol):
    def step(self, token: int) -> str: ...

    def flush(self) -> str: ...


class Tokenizer(Protocol):
    bos_id: int | None
    eos_ids: tuple[int, ...]
    chat_template: ChatTemplate | None
    bos_token: str
    eos_token: str

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def stream_decoder(self) -> StreamDecoder: ...


class ByteTokenizer:
    """Llama's layout without a vocabulary file: 0 pad, 1 bos, 2 eos, then byte b as b + 3
    (sentencepiece's byte-fallback ids). Ids beyond 258 decode to nothing."""

    OFFSET = 3
    chat_template: ChatTemplate | None = None
    bos_token = eos_token = ""

    def __init__(self, bos_id: int | None = 1, eos_ids: tuple[int, ...] = (2,)) -> None:
        self.bos_id = bos_id
        self.eos_ids = eos_ids

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [b + self.OFFSET for b in text.encode("utf-8")]
        bos = [self.bos_id] if self.bos_id is not None and add_special_tokens else []
        return bos + ids

    def decode(self, ids: list[int]) -> str:
        return bytes(self._bytes(ids)).decode("utf-8", errors="replace")

    def _bytes(self, ids: list[int]) -> list[int]:
        return [i - self.OFFSET for i in ids if self.OFFSET <= i < self.OFFSET + 256]

    def stream_decoder(self) -> StreamDecoder:
        return _ByteStream(self)


class _ByteStream:
    """An incremental UTF-8 decoder: a character split over tokens comes out whole, with
    the same replacement characters as decoding the whole list at once."""

    def __init__(self, tok: ByteTokenizer) -> None:
        self._tok = tok
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def step(self, token: int) -> str:
        return self._dec.decode(bytes(self._tok._bytes([token])))

    def flush(self) -> str:
        return self._dec.decode(b"", final=True)


class HFTokenizer:
    """A `tokenizers` Tokenizer (from tokenizer.json or rebuilt from GGUF metadata); its
    post-processor adds BOS where the model wants one."""

    def __init__(self, tokenizer: Any, bos_id: int | None, eos_ids: tuple[int, ...],
                 chat_template: ChatTemplate | None = None, bos_token: str = "",
                 eos_token: str = "") -> None:
        from tokenizers import Tokenizer as _Tokenizer

        if isinstance(tokenizer, str | Path):
            try:
                tokenizer = _Tokenizer.from_file(str(tokenizer))
            except Exception as e:  # tokenizers raises a bare Exception on a bad file
                raise TokenizerError(f"cannot read the tokenizer {tokenizer}: {e}") from None
        self._tok = tokenizer
        self.bos_id = bos_id
        self.eos_ids = eos_ids
        self.chat_template = chat_template
        self.bos_token, self.eos_token = bos_token, eos_token

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def stream_decoder(self) -> StreamDecoder:
        return _HFStream(self._tok)


class _HFStream:
    """tokenizers' DecodeStream: holds a token back until its bytes form whole characters."""

    def __init__(self, tok: Any) -> None:
        from tokenizers.decoders import DecodeStream

        self._tok, self._stream = tok, DecodeStream(skip_special_tokens=True)

    def step(self, token: int) -> str:
        try:
            return self._stream.step(self._tok, token) or ""
        except Exception:  # an id past the tokenizer's vocabulary (padded embeddings)
            return ""

    def flush(self) -> str:
        return ""


def _special(d: dict[str, Any], key: str) -> str:
    v = d.get(key)
    if isinstance(v, dict):  # {"content": "<s>", ...} in older tokenizer_config.json files
        v = v.get("content")
    return v if isinstance(v, str) else ""


def load_tokenizer(model_dir: str | Path | None, bos_id: int | None, eos_ids: tuple[int, ...],
                   tokenizer_path: str | Path | None = None,
                   chat_template: ChatTemplate | None = None) -> Tokenizer:
    """model_dir None (a preset with random weights): bytes. Otherwise tokenizer_path, or
    model_dir/tokenizer.json; a model without one is refused, never given bytes."""
    import json

    if model_dir is None and tokenizer_path is None:
        return ByteTokenizer(bos_id, eos_ids)
    path = Path(tokenizer_path) if tokenizer_path is not None else Path(model_dir) / "tokenizer.json"
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        where = f"in {model_dir}" if tokenizer_path is None else f"at {tokenizer_path}"
        raise TokenizerError(f"no tokenizer.json {where}; pass --tokenizer with the path of "
                             "the model's tokenizer.json")
    specials: dict[str, Any] = {}
    config = path.parent / "tokenizer_config.json"
    if config.is_file():
        try:
            specials = json.loads(config.read_text())
        except json.JSONDecodeError as e:
            raise TokenizerError(f"malformed {config}: {e}") from None
        if not isinstance(specials, dict):
            specials = {}
    return HFTokenizer(path, bos_id, eos_ids, chat_template, _special(specials, "bos_token"),
                       _special(specials, "eos_token"))
