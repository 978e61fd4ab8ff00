"""PNG plots from the result tables: TTFT vs prompt length for every system, decode
latency vs context, the ablation, coverage memory vs latency, batch throughput.
Each figure carries the run's metadata in its footer and in its PNG text chunks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")   # files only; no display on CI or the GPU machine
import matplotlib.pyplot as plt  # noqa: E402

from hybridgraph.bench.table import Results  # noqa: E402


def _footer(meta: dict[str, Any]) -> str:
    return (f"{meta['model_shape']} | {meta['dtype']}\n{meta['device']} | driver {meta['driver']}"
            f" | torch {meta['torch']} | triton {meta['triton']}\ncopy bandwidth "
            f"{meta['copy_bandwidth_gbs']:.1f} GB/s, matmul {meta['matmul_tflops']:.1f} TFLOP/s "
            f"({meta['matmul_dtype']}), measured in this run | {meta['date']}")


def _save(fig: Any, res: Results, out: Path, name: str, title: str) -> str:
    fig.suptitle(title)
    fig.text(0.01, 0.005, _footer(res.meta), fontsize=6, va="bottom", family="monospace")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    meta = {"Title": title, "Software": "hybridgraph bench",
            "Description": json.dumps({k: res.meta[k] for k in sorted(res.meta)})}
    fig.savefig(out / name, dpi=120, metadata=meta)
    plt.close(fig)
    return name


def _series(rows: list[dict[str, Any]], key: str, x: str, y: str) -> dict[str, tuple[list, list]]:
    out: dict[str, tuple[list, list]] = {}
    for r in rows:
        xs, ys = out.setdefault(str(r[key]), ([], []))
        xs.append(r[x])
        ys.append(r[y])
    return out


def _log_axes(ax: Any, legend_size: int = 8, **labels: str) -> None:
    """A log y axis (latencies and rates span decades), grid lines at both tick levels,
    the legend: the frame the line plots share. labels: xlabel, ylabel, title."""
    ax.set(yscale="log", **labels)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=legend_size)


def _log2_x(ax: Any, sizes: list[int]) -> None:
    """A log2 x axis ticked at exactly the sizes measured (batches, client counts)."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(x) for x in sizes])


def plot_ttft(res: Results, out: Path) -> str | None:
    t = res.tables
    if not any(k in t for k in ("ttft", "peers_ttft", "ablation_ttft")):
        return None
    fig, ax = plt.subplots(figsize=(8, 5))
    for name in ("ttft", "peers_ttft"):
        if name in t:
            for system, (xs, ys) in _series(t[name].records(), "system", "prompt_len",
                                            "median_ms").items():
                ax.plot(xs, ys, marker="o", label=system)
    if "ablation_ttft" in t:
        for mode, (xs, ys) in _series(t["ablation_ttft"].records(), "mode", "prompt_len",
                                      "median_ms").items():
            ax.plot(xs, ys, marker="x", linestyle=":", label=f"ablation: {mode}")
    _log_axes(ax, xlabel="prompt length (tokens)", ylabel="TTFT, median (ms)")
    return _save(fig, res, out, "ttft.png", "Time to first token vs prompt length")


def plot_decode(res: Results, out: Path) -> str | None:
    t = res.tables
    if "decode_tokens" not in t:
        return None
    fig, ax = plt.subplots(figsize=(8, 5))
    for system, (xs, ys) in _series(t["decode_tokens"].records(), "system", "context",
                                    "median_ms").items():
        ax.plot(xs, ys, linewidth=1, label=f"{system} (per token, median over runs)")
    ax.axhline(res.meta["decode_floor_ms"], color="k", linestyle="--",
               label="floor: weight bytes / copy bandwidth")
    if "peers_decode" in t:
        for r in t["peers_decode"].records():
            ax.axhline(r["ms_per_token"], linestyle="-.", color="gray", alpha=0.8)
            ax.annotate(f"{r['system']} (from generate totals)", (ax.get_xlim()[0], r["ms_per_token"]),
                        fontsize=7, va="bottom")
    _log_axes(ax, xlabel="context (tokens)", ylabel="decode latency (ms/token)")
    return _save(fig, res, out, "decode.png", "Per-token decode latency vs context")


def plot_ablation(res: Results, out: Path) -> str | None:
    t = res.tables
    if "ablation_ttft" not in t or "ablation_decode" not in t:
        return None
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4.5))
    series = _series(t["ablation_ttft"].records(), "mode", "prompt_len", "median_ms")
    lengths = sorted({n for xs, _ in series.values() for n in xs})
    width = 0.8 / max(len(series), 1)
    for i, (mode, (xs, ys)) in enumerate(series.items()):
        pos = [lengths.index(x) + i * width for x in xs]
        a1.bar(pos, ys, width, label=mode)
    a1.set_xticks([j + 0.4 - width / 2 for j in range(len(lengths))], [str(n) for n in lengths])
    a1.set(xlabel="prompt length", ylabel="TTFT median (ms)", yscale="log", title="TTFT")
    a1.legend(fontsize=8)
    dec = t["ablation_decode"].records()
    a2.bar([r["mode"] for r in dec], [r["ms_per_token"] for r in dec])
    a2.axhline(res.meta["decode_floor_ms"], color="k", linestyle="--", label="floor")
    a2.set(ylabel="decode ms/token", title="Decode")
    a2.legend(fontsize=8)
    return _save(fig, res, out, "ablation.png", "Ablation: eager / jit / graph / hybrid")


def plot_coverage(res: Results, out: Path) -> str | None:
    if "coverage" not in res.tables:
        return None
    fig, ax = plt.subplots(figsize=(7, 5))
    for i, r in enumerate(res.tables["coverage"].records()):
        label = f"{r['strategy']} ({r['pool']} pool)"
        ax.scatter(r["graph_mib"], r["mean_ttft_ms"], marker="o", color=f"C{i}", label=label)
        ax.scatter(r["graph_mib"], r["p99_ttft_ms"], marker="^", alpha=0.5, color=f"C{i}")
    ax.legend(fontsize=7)
    ax.set(xlabel="graph memory (MiB)", ylabel="TTFT over lengths (ms): o mean, ^ P99",
           xscale="log")
    ax.grid(True, alpha=0.3)
    return _save(fig, res, out, "coverage.png", "Coverage: graph memory vs TTFT")


def plot_batch(res: Results, out: Path) -> str | None:
    if "batch" not in res.tables:
        return None
    fig, ax = plt.subplots(figsize=(7, 5))
    series = _series(res.tables["batch"].records(), "mode", "batch", "tokens_per_s")
    for mode, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", label=mode)
    _log2_x(ax, sorted({x for xs, _ in series.values() for x in xs}))
    _log_axes(ax, xlabel="batch", ylabel="tokens/s")
    return _save(fig, res, out, "batch.png", "Batch throughput")


def plot_serve(res: Results, out: Path) -> str | None:
    if "serve" not in res.tables:
        return None
    rows = res.tables["serve"].records()
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(13, 4.5))
    for batching, style in (("on", "-"), ("off", "--")):
        mine = sorted((r for r in rows if r["batching"] == batching), key=lambda r: r["clients"])
        if not mine:
            continue
        xs = [r["clients"] for r in mine]
        a1.plot(xs, [r["tokens_per_s"] for r in mine], style, marker="o",
                label=f"batching {batching}")
        a2.plot(xs, [r["token_median_ms"] for r in mine], style, marker="o",
                label=f"batching {batching}, median")
        a2.plot(xs, [r["token_p99_ms"] for r in mine], style, marker="^", alpha=0.6,
                label=f"batching {batching}, P99")
        a3.plot(xs, [r["ttft_median_ms"] for r in mine], style, marker="o",
                label=f"batching {batching}, median")
        a3.plot(xs, [r["ttft_p99_ms"] for r in mine], style, marker="^", alpha=0.6,
                label=f"batching {batching}, P99")
    for ax, ylabel, title in ((a1, "tokens/s, all clients", "Aggregate throughput"),
                              (a2, "ms between tokens", "Per-token latency"),
                              (a3, "ms to first token", "TTFT")):
        _log2_x(ax, sorted({r["clients"] for r in rows}))
        _log_axes(ax, legend_size=7, xlabel="concurrent clients", ylabel=ylabel, title=title)
    return _save(fig, res, out, "serve.png", "Serving concurrent clients: batching on vs off")


def write_plots(res: Results, out: Path) -> list[str]:
    names = [f(res, out) for f in (plot_ttft, plot_decode, plot_ablation, plot_coverage,
                                   plot_batch, plot_serve)]
    return [n for n in names if n is not None]
