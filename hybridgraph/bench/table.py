"""The one result type every suite returns, and the summary statistics they all use."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Table:
    """One result table: one CSV, one markdown table in SUMMARY.md."""

    name: str                      # file stem, e.g. "ttft"
    title: str
    columns: list[str]
    rows: list[list[Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, *values: Any) -> None:
        if len(values) != len(self.columns):
            raise ValueError(f"{self.name}: {len(values)} values for {len(self.columns)} columns")
        self.rows.append(list(values))

    def records(self) -> list[dict[str, Any]]:
        return [dict(zip(self.columns, r, strict=True)) for r in self.rows]


@dataclass
class Results:
    """Everything one `bench` invocation measured, plus what it skipped and why."""

    meta: dict[str, Any]
    tables: dict[str, Table] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)   # suite or part -> reason

    def add(self, *tables: Table) -> None:
        for t in tables:
            self.tables[t.name] = t


def summarize(ms: Sequence[float]) -> dict[str, float]:
    """Median, mean, std, P90, P99, min, max of a sample (NaN-free input expected)."""
    a = np.asarray(ms, dtype=np.float64)
    if a.size == 0:
        nan = math.nan
        return dict(median=nan, mean=nan, std=nan, p90=nan, p99=nan, min=nan, max=nan, n=0)
    return dict(median=float(np.median(a)), mean=float(a.mean()),
                std=float(a.std(ddof=1)) if a.size > 1 else 0.0,
                p90=float(np.percentile(a, 90)), p99=float(np.percentile(a, 99)),
                min=float(a.min()), max=float(a.max()), n=int(a.size))


def make_prompt(length: int, vocab: int, seed: int = 0) -> list[int]:
    """Random token ids above the special ids (0 pad, 1 bos, 2 eos), the same for a given
    (length, seed) in every system and mode, so they all see the same prompts."""
    rng = np.random.default_rng(seed * 100_003 + length)
    return [int(x) for x in rng.integers(3, vocab, size=length)]
