"""What a request asks for and what it gets back; shared by the engine, server and benchmarks.

`SamplingParams` is the one owner of the sampling fields and their bounds: the engine, the
wire protocol and the clients all build one, so a bad value is refused with the same
message wherever it comes from.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

MAX_TOP_K = 2**31 - 1   # the sampler keeps top_k in an int64 tensor; this leaves headroom
MAX_SEED = 2**63 - 1    # the seed buffer is int64
MAX_TOKEN_ID = 2**63 - 1


class RequestError(ValueError):
    """A request the engine refuses; `field` names the offending input."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def _type_name(v: object) -> str:
    return type(v).__name__


def _as_int(name: str, v: object) -> int:
    """An integer (numpy's included), never a bool or a float."""
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise RequestError(name, f"must be an integer, got {_type_name(v)} {v!r}")
    return int(v)


def _as_float(name: str, v: object) -> float:
    """A finite real number (numpy's included), never a bool."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise RequestError(name, f"must be a number, got {_type_name(v)} {v!r}")
    x = float(v)
    if not math.isfinite(x):
        raise RequestError(name, f"must be finite, got {x}")
    return x


@dataclass(frozen=True)
class SamplingParams:
    """The sampling fields and, in `validate`, their bounds: the engine, the wire protocol
    and the clients all check through it, so a bad value gets the same message anywhere.

    temperature 0 is greedy; top_k 0 (or -1) and top_p 1 keep every token; seed None draws
    one, and the same seed gives the same tokens. Numpy scalars are taken as Python numbers.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def validate(self) -> SamplingParams:
        """These params checked and normalised (plain Python numbers, top_k -1 as 0), or
        RequestError naming the first bad field."""
        temperature = _as_float("temperature", self.temperature)
        if temperature < 0:
            raise RequestError("temperature", f"must be >= 0 (0 is greedy), got {temperature}")
        top_k = _as_int("top_k", self.top_k)
        if top_k == -1:
            top_k = 0  # the common spelling of "off" elsewhere (vLLM, HF configs)
        if not 0 <= top_k <= MAX_TOP_K:
            raise RequestError("top_k", f"must be an integer in [0, {MAX_TOP_K}] (0 or -1 is "
                                        f"off), got {top_k}")
        top_p = _as_float("top_p", self.top_p)
        if not 0 < top_p <= 1:
            raise RequestError("top_p", f"must be in (0, 1], got {top_p} (1 is off)")
        seed = None if self.seed is None else _as_int("seed", self.seed)
        if seed is not None and not 0 <= seed <= MAX_SEED:
            raise RequestError("seed", f"must be an integer in [0, 2^63), got {seed}")
        return SamplingParams(temperature, top_k, top_p, seed)

    @classmethod
    def of(cls, value: object) -> SamplingParams:
        """`value` checked as a SamplingParams (see validate): None is the defaults; anything
        else is refused, a dict included (a misspelt key would otherwise be silently
        greedy)."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value.validate()
        raise RequestError("sampling", f"must be a SamplingParams, got {_type_name(value)}; "
                                       f"build one with SamplingParams(temperature=..., ...)")

    def to_wire(self) -> dict[str, Any]:
        """The protocol's fields, checked first."""
        v = self.validate()
        msg: dict[str, Any] = {"temperature": v.temperature, "top_k": v.top_k, "top_p": v.top_p}
        if v.seed is not None:
            msg["seed"] = v.seed
        return msg


def check_stop_ids(stop_ids: object) -> list[int] | None:
    """None (the tokenizer's EOS ids) or a list/tuple of token ids >= 0."""
    if stop_ids is None:
        return None
    if not isinstance(stop_ids, list | tuple):
        raise RequestError("stop_ids", f"must be a list of token ids, got "
                                       f"{_type_name(stop_ids)} {stop_ids!r:.64}")
    out = []
    for i, t in enumerate(stop_ids):
        if isinstance(t, bool) or not isinstance(t, numbers.Integral):
            raise RequestError("stop_ids", f"[{i}] must be an integer token id, got "
                                           f"{_type_name(t)} {t!r:.64}")
        if not 0 <= t <= MAX_TOKEN_ID:
            raise RequestError("stop_ids", f"[{i}] = {t} is not a token id (>= 0)")
        out.append(int(t))
    return out


@dataclass
class GenerationResult:
    tokens: list[int]
    prompt_len: int
    ttft_ms: float                 # prompt ids on the host -> first token id on the host
    token_ms: list[float] = field(default_factory=list)  # each later token's latency
    finish_reason: str = "length"  # "stop" | "length" | "cancelled"
    text: str | None = None        # with stop strings or a text callback: the text, cut
                                   # before any stop string (issue 11)

    @property
    def decode_ms_per_token(self) -> float:
        return sum(self.token_ms) / len(self.token_ms) if self.token_ms else float("nan")

    @property
    def total_ms(self) -> float:
        return self.ttft_ms + sum(self.token_ms)

    @property
    def tokens_per_s(self) -> float:
        return 1e3 * len(self.tokens) / self.total_ms if self.total_ms > 0 else float("nan")


# Called with (row, token); returning False cancels the request.
TokenCallback = Callable[[int, int], bool | None]
# Called with (row, token, that token's text delta); returning False cancels the request.
TextCallback = Callable[[int, int, str], bool | None]

__all__ = ["GenerationResult", "RequestError", "SamplingParams", "TextCallback", "TokenCallback",
           "check_stop_ids"]
