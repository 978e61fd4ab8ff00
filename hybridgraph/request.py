"""What a request asks for and what it gets back; shared by the engine, server and benchmarks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


class RequestError(ValueError):
    """A request the engine refuses; `field` names the offending input."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0   # 0 is greedy
    top_k: int = 0             # 0 keeps every token
    top_p: float = 1.0         # 1 keeps every token
    seed: int | None = None    # None draws one; the same seed gives the same tokens

    def validate(self) -> SamplingParams:
        if not isinstance(self.temperature, int | float) or not self.temperature >= 0:
            raise RequestError("temperature", f"must be >= 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) \
                or not 0 <= self.top_k < 2**31:
            raise RequestError("top_k", f"must be an integer in [0, 2^31), got {self.top_k!r}")
        if not isinstance(self.top_p, int | float) or not 0 < self.top_p <= 1:
            raise RequestError("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)
                                      or not 0 <= self.seed < 2**63):
            raise RequestError("seed", f"must be an integer in [0, 2^63), got {self.seed!r}")
        return self


@dataclass
class GenerationResult:
    tokens: list[int]
    prompt_len: int
    ttft_ms: float                 # prompt ids on the host -> first token id on the host
    token_ms: list[float] = field(default_factory=list)  # each later token's latency
    finish_reason: str = "length"  # "stop" | "length" | "cancelled"

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
