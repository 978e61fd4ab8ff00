"""Generation defaults of a checkpoint: generation_config.json's end ids and sampling.

config.json's eos_token_id and generation_config.json's are used together: Llama-3-Instruct
shipped with only <|end_of_text|> in config.json and its end-of-turn <|eot_id|> listed in
generation_config.json alone; reading one file runs past the answer into a new turn.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hybridgraph.model.config import ConfigError, read_json_object

# HF's GenerationConfig defaults when do_sample is true and a field is absent.
_HF_TOP_K = 50


@dataclass(frozen=True)
class GenerationDefaults:
    eos_token_ids: tuple[int, ...] = ()
    temperature: float = 0.0   # greedy unless the checkpoint asks to sample
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int | None = None


def _ids(value: Any, field: str) -> tuple[int, ...]:
    if value is None:
        return ()
    items = value if isinstance(value, list) else [value]
    for v in items:
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ConfigError(f"generation_config.json: {field} must be a token id or a list "
                              f"of them, got {value!r}")
    return tuple(items)


def _number(d: dict[str, Any], key: str, default: float) -> float:
    v = d.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ConfigError(f"generation_config.json: {key} must be a number, got {v!r}")
    return float(v)


def generation_defaults(d: dict[str, Any]) -> GenerationDefaults:
    """From a parsed generation_config.json."""
    eos = _ids(d.get("eos_token_id"), "eos_token_id")
    max_new = d.get("max_new_tokens")
    if max_new is not None and (not isinstance(max_new, int) or isinstance(max_new, bool)
                                or max_new < 1):
        raise ConfigError(f"generation_config.json: max_new_tokens must be an integer >= 1, "
                          f"got {max_new!r}")
    if not d.get("do_sample", False):
        return GenerationDefaults(eos, max_new_tokens=max_new)
    top_k = d.get("top_k", _HF_TOP_K)
    if top_k is None:
        top_k = 0
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0:
        raise ConfigError(f"generation_config.json: top_k must be an integer >= 0, got {top_k!r}")
    return GenerationDefaults(eos, _number(d, "temperature", 1.0), top_k,
                              _number(d, "top_p", 1.0), max_new)


def read_generation_config(model_dir: str | Path) -> GenerationDefaults:
    path = Path(model_dir) / "generation_config.json"
    if not path.is_file():
        return GenerationDefaults()
    return generation_defaults(read_json_object(path, "generation_config.json"))


def merge_eos(*groups: tuple[int, ...]) -> tuple[int, ...]:
    """Every end id of every source, in first-seen order."""
    return tuple(dict.fromkeys(i for g in groups for i in g))
