"""Writes what a run measured: a CSV per table, meta.json, and SUMMARY.md (the tables,
the headline, and plainly where hybridgraph is slower than a peer). Plots: plots.py."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from hybridgraph.bench.hw import floor_frac
from hybridgraph.bench.table import Results, Table

LONG_TABLES = ("decode_tokens",)
META_KEYS = ("device", "tp", "driver", "cuda", "torch", "triton", "transformers", "dtype",
             "model_shape", "copy_bandwidth_gbs", "matmul_tflops", "matmul_dtype",
             "weight_bytes_per_token", "decode_floor_ms", "date")


def fmt(v: Any) -> str:
    if isinstance(v, bool) or not isinstance(v, float):
        return str(v)
    if math.isnan(v) or math.isinf(v):
        return str(v)
    a = abs(v)
    return f"{v:.1f}" if a >= 100 else f"{v:.2f}" if a >= 1 else f"{v:.3g}"


def meta_lines(meta: dict[str, Any]) -> list[str]:
    return [f"{k}: {fmt(meta[k])}" for k in META_KEYS if k in meta]


def write_csv(table: Table, meta: dict[str, Any], path: Path) -> None:
    with path.open("w", newline="") as f:
        f.write(f"# hybridgraph benchmark: {table.title}\n")
        for line in meta_lines(meta):
            f.write(f"# {line}\n")
        for note in table.notes:
            f.write(f"# note: {note}\n")
        w = csv.writer(f)
        w.writerow(table.columns)
        for row in table.rows:
            w.writerow([f"{v:.6g}" if isinstance(v, float) else v for v in row])


def read_csv(path: Path) -> tuple[dict[str, str], list[dict[str, str]]]:
    """(metadata from the comment header, rows): the inverse of write_csv."""
    meta: dict[str, str] = {}
    body = []
    for line in path.read_text().splitlines():
        if line.startswith("# "):
            key, _, value = line[2:].partition(": ")
            meta.setdefault(key, value)
        else:
            body.append(line)
    return meta, list(csv.DictReader(body))


def markdown(table: Table) -> str:
    out = [f"### {table.title}", "", "| " + " | ".join(table.columns) + " |",
           "|" + "---|" * len(table.columns)]
    out += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in table.rows]
    out += [""] + [f"_{n}_  " for n in table.notes]
    return "\n".join(out) + "\n"


def _ours(res: Results) -> tuple[str | None, dict[int, float], float | None]:
    """hybridgraph's default-mode system name, TTFT median by length, decode ms/token."""
    name, ttft, dec = None, {}, None
    if "ttft" in res.tables:
        for r in res.tables["ttft"].records():
            name = r["system"]
            ttft[r["prompt_len"]] = r["median_ms"]
    if "decode" in res.tables:
        for r in res.tables["decode"].records():
            if r["context"] == "all":
                name, dec = r["system"], r["mean_ms"]
    return name, ttft, dec


def _ttft_and_decode(res: Results, ttft_table: str, decode_table: str,
                     key: str) -> dict[str, tuple[dict[int, float], float | None]]:
    """Per `key` (system or mode): its median TTFT by prompt length, and its decode ms per
    token (None where the decode table lacks it)."""
    out: dict[str, tuple[dict[int, float], float | None]] = {}
    if ttft_table in res.tables:
        for r in res.tables[ttft_table].records():
            out.setdefault(r[key], ({}, None))[0][r["prompt_len"]] = r["median_ms"]
    if decode_table in res.tables:
        for r in res.tables[decode_table].records():
            out[r[key]] = (out.get(r[key], ({}, None))[0], r["ms_per_token"])
    return out


def _peers(res: Results) -> dict[str, tuple[dict[int, float], float | None]]:
    return _ttft_and_decode(res, "peers_ttft", "peers_decode", "system")


def _ablation(res: Results) -> dict[str, tuple[dict[int, float], float | None]]:
    return _ttft_and_decode(res, "ablation_ttft", "ablation_decode", "mode")


def headline(res: Results) -> Table | None:
    name, ttft, dec = _ours(res)
    if name is None:
        return None
    lengths = sorted(ttft)
    lo, hi = (lengths[0], lengths[-1]) if lengths else (None, None)
    floor = res.meta["decode_floor_ms"]
    t = Table("headline", "Headline: TTFT and decode per system (medians; decode = mean ms/token)",
              ["system", f"ttft_{lo}_ms", f"ttft_{hi}_ms", "decode_ms_per_token", "tokens_per_s",
               "floor_frac"])
    nan = math.nan

    def row(system: str, tt: dict[int, float], d: float | None) -> None:
        d = nan if d is None else d
        t.add(system, tt.get(lo, nan), tt.get(hi, nan), d, 1e3 / d if d > 0 else nan,
              floor_frac(d, floor))

    row(name, ttft, dec)
    for mode, (tt, d) in _ablation(res).items():
        if f"hybridgraph-{mode}" != name:
            row(f"hybridgraph-{mode}", tt, d)
    for system, (tt, d) in _peers(res).items():
        row(system, tt, d)
    return t


def slower_than_peers(res: Results) -> list[str]:
    """Every place the numbers show a hybridgraph mode slower than a peer, in words: the
    default mode's full TTFT curve and decode, then each other ablation mode."""
    name, ttft, dec = _ours(res)
    systems = [(name, ttft, dec)] if name is not None else []
    systems += [(f"hybridgraph-{m}", tt, d) for m, (tt, d) in _ablation(res).items()
                if f"hybridgraph-{m}" != name]
    lines = []
    for ours, o_tt, o_dec in systems:
        for peer, (tt, d) in _peers(res).items():
            common = sorted(set(tt) & set(o_tt))
            slow = [n for n in common if o_tt[n] > tt[n]]
            if slow:
                worst = max(slow, key=lambda n: o_tt[n] / tt[n])
                lines.append(f"- TTFT: {ours} is slower than {peer} at {len(slow)} of "
                             f"{len(common)} prompt lengths ({', '.join(map(str, slow))}); worst "
                             f"at {worst} tokens: {fmt(o_tt[worst])} ms vs {fmt(tt[worst])} ms "
                             f"({o_tt[worst] / tt[worst]:.2f}x).")
            if o_dec is not None and d is not None and o_dec > d:
                lines.append(f"- Decode: {ours} is slower than {peer}: {fmt(o_dec)} ms/token "
                             f"vs {fmt(d)} ms/token ({o_dec / d:.2f}x).")
    return lines


def write_summary(res: Results, out: Path, files: list[str],
                  timings: dict[str, float]) -> None:
    m = res.meta
    parts = [f"# hybridgraph benchmarks: {m['model']} ({m['dtype']}) on {m['device']}", "",
             "## Setup", "", "| | |", "|---|---|"]
    parts += [f"| {k} | {fmt(m[k])} |" for k in META_KEYS if k in m]
    parts += ["", f"Decode floor: {fmt(m['decode_floor_ms'])} ms/token = "
                  f"{m['weight_bytes_per_token'] / 1e6:.1f} MB of weights read per token / "
                  f"{fmt(m['copy_bandwidth_gbs'])} GB/s copy bandwidth measured in this run. "
                  "floor_frac = floor / measured (1.0 = at the floor).", ""]
    head = headline(res)
    if head is not None:
        parts += ["## Headline", "", markdown(head)]
    parts += ["## Where hybridgraph is slower than a peer", ""]
    if not _peers(res):
        parts += ["Peers were not measured in this run.", ""]
    else:
        slow = slower_than_peers(res)
        parts += (slow or ["Nowhere in these measurements."]) + [""]
    # The per-token table has a row per token: it lives in its CSV and the decode plot.
    parts += ["## Tables", ""] + [markdown(t) for t in res.tables.values()
                                  if t.name not in LONG_TABLES]
    if res.skipped:
        parts += ["## Skipped", ""] + [f"- **{k}**: {v}" for k, v in res.skipped.items()] + [""]
    if timings:
        parts += ["## Suite wall times", "", "| suite | seconds |", "|---|---|"]
        parts += [f"| {k} | {v:.1f} |" for k, v in timings.items()] + [""]
    parts += ["## Files", ""] + [f"- `{f}`" for f in files] + [""]
    (out / "SUMMARY.md").write_text("\n".join(parts))


def write_all(res: Results, out: Path, timings: dict[str, float]) -> list[str]:
    """Every file of the run into `out`; returns their names."""
    from hybridgraph.bench.plots import write_plots

    out.mkdir(parents=True, exist_ok=True)
    files = []
    tables = dict(res.tables)
    head = headline(res)
    if head is not None:
        tables["headline"] = head
    for name, table in tables.items():
        write_csv(table, res.meta, out / f"{name}.csv")
        files.append(f"{name}.csv")
    files += write_plots(res, out)
    (out / "meta.json").write_text(json.dumps({**res.meta, "skipped": res.skipped,
                                               "suite_seconds": timings}, indent=2))
    files.append("meta.json")
    write_summary(res, out, files, timings)
    return files + ["SUMMARY.md"]
