"""Tokenizers: a model directory's tokenizer.json, or a byte-level one for random presets.

Token ids are first-class everywhere else (server, benchmarks); text is a convenience.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol


class Tokenizer(Protocol):
    bos_id: int | None
    eos_ids: tuple[int, ...]

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """Llama's layout without a vocabulary file: 0 pad, 1 bos, 2 eos, then byte b as b + 3
    (sentencepiece's byte-fallback ids). Ids beyond 258 decode to nothing."""

    OFFSET = 3

    def __init__(self, bos_id: int | None = 1, eos_ids: tuple[int, ...] = (2,)) -> None:
        self.bos_id = bos_id
        self.eos_ids = eos_ids

    def encode(self, text: str) -> list[int]:
        ids = [b + self.OFFSET for b in text.encode("utf-8")]
        return ([self.bos_id] if self.bos_id is not None else []) + ids

    def decode(self, ids: list[int]) -> str:
        data = bytes(i - self.OFFSET for i in ids if self.OFFSET <= i < self.OFFSET + 256)
        return data.decode("utf-8", errors="replace")


class HFTokenizer:
    """tokenizer.json through the `tokenizers` library (its post-processor adds BOS)."""

    def __init__(self, path: str | Path, bos_id: int | None, eos_ids: tuple[int, ...]) -> None:
        from tokenizers import Tokenizer as _Tokenizer

        self._tok = _Tokenizer.from_file(str(path))
        self.bos_id = bos_id
        self.eos_ids = eos_ids

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)


def load_tokenizer(model_dir: str | Path | None, bos_id: int | None,
                   eos_ids: tuple[int, ...]) -> Tokenizer:
    if model_dir is not None and (Path(model_dir) / "tokenizer.json").is_file():
        return HFTokenizer(Path(model_dir) / "tokenizer.json", bos_id, eos_ids)
    return ByteTokenizer(bos_id, eos_ids)
