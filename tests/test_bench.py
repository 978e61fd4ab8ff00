"""`hybridgraph bench all --quick` end to end on the CPU, and the report's pure parts.

The quick run is one real subprocess (tiny model, few runs, ~1-2 minutes on 2 cores);
the module-scoped fixture shares it between the checks of what it wrote.
"""

from __future__ import annotations

import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hybridgraph.bench.report import read_csv, slower_than_peers
from hybridgraph.bench.table import Results, Table, make_prompt, summarize

REPO = Path(__file__).resolve().parents[1]
CPU_TABLES = ("cost", "peers_ttft", "peers_decode", "ipc", "ttft", "ttft_spaced", "decode",
              "decode_tokens", "p99", "ablation_ttft", "ablation_decode", "batch", "headline")
PLOTS = ("ttft.png", "decode.png", "ablation.png", "batch.png")
META = ("device", "driver", "torch", "triton", "dtype", "model_shape", "copy_bandwidth_gbs",
        "matmul_tflops", "decode_floor_ms")
# Counts that are rightly zero on the CPU: no CUDA graphs there.
# logit_rel_err: a float32 peer on the CPU can agree with us exactly (seen with transformers 5.24).
MAY_BE_ZERO = {"logit_rel_err", "graphs", "graph_mib", "compile_s",  # Triton only
               "dynamo_frames", "dynamo_s", "inductor_s"}  # torch.compile only


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, float]:
    out = tmp_path_factory.mktemp("bench")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "hybridgraph.cli", "bench", "all", "--quick",
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, proc.stdout, elapsed


def test_every_table_written_with_metadata(quick_run: tuple[Path, str, float]) -> None:
    out, _, _ = quick_run
    for name in CPU_TABLES:
        path = out / f"{name}.csv"
        assert path.is_file(), f"{name}.csv missing"
        meta, rows = read_csv(path)
        assert rows, f"{name}.csv has no rows"
        for key in META:
            assert meta.get(key, "").strip(), f"{name}.csv lacks metadata {key}"
        assert float(meta["copy_bandwidth_gbs"]) > 0 and float(meta["matmul_tflops"]) > 0
        assert meta["model_shape"].startswith("tiny:")


def test_numbers_finite_and_positive(quick_run: tuple[Path, str, float]) -> None:
    out, _, _ = quick_run
    for name in CPU_TABLES:
        _, rows = read_csv(out / f"{name}.csv")
        for row in rows:
            for col, cell in row.items():
                try:
                    v = float(cell)
                except ValueError:
                    continue   # a label: system, mode, context range, yes/no
                assert math.isfinite(v), f"{name}.{col} = {cell}"
                if col in MAY_BE_ZERO or col.startswith("std"):
                    assert v >= 0, f"{name}.{col} = {cell}"
                else:
                    assert v > 0, f"{name}.{col} = {cell} in {row}"


def test_tables_cover_what_was_asked(quick_run: tuple[Path, str, float]) -> None:
    out, _, _ = quick_run
    _, ttft = read_csv(out / "ttft.csv")
    assert [int(r["prompt_len"]) for r in ttft] == [10, 50, 100]
    _, spaced = read_csv(out / "ttft_spaced.csv")
    assert [int(r["prompt_len"]) for r in spaced] == [10, 100]
    assert {r["sm_mhz"] for r in ttft + spaced} == {"n/a (no GPU)"}  # a CPU run says so
    _, dec = read_csv(out / "decode.csv")
    assert [r["context"] for r in dec] == ["10-50", "51-100", "101-200", "201-300", "301-400",
                                           "401-407", "all"]
    assert sum(int(r["count"]) for r in dec[:-1]) == int(dec[-1]["count"]) == 396
    _, p99 = read_csv(out / "p99.csv")
    assert all(int(r["runs"]) == 100 for r in p99)
    _, abl = read_csv(out / "ablation_decode.csv")
    assert {r["mode"] for r in abl} == {"eager", "jit"}
    _, batch = read_csv(out / "batch.csv")
    assert {(r["mode"], int(r["batch"])) for r in batch} == {
        (m, b) for m in ("eager", "jit") for b in (1, 4)}
    _, peers = read_csv(out / "peers_decode.csv")
    assert {r["system"] for r in peers} == {"hf-eager", "hf-static"}
    assert all(float(r["logit_rel_err"]) < 1e-4 for r in peers)   # same weights, float32
    _, ipc = read_csv(out / "ipc.csv")
    assert {"ipc", "socket_added", "http_ipc", "http_added"} <= {r["metric"] for r in ipc}
    _, cost = read_csv(out / "cost.csv")   # every mode from empty compile caches, then again
    assert [(r["mode"], r["caches"]) for r in cost] == [
        (m, c) for m in ("eager", "jit") for c in ("cold", "restart")]
    # torch.compile's share of start-up: none in eager mode; jit compiles its samplers
    frames = {(r["mode"], r["caches"]): int(r["dynamo_frames"]) for r in cost}
    assert frames[("eager", "cold")] == 0 and frames[("jit", "cold")] > 0
    assert all(float(r["dynamo_s"]) > 0 for r in cost if r["mode"] == "jit")


def test_plots_and_summary(quick_run: tuple[Path, str, float]) -> None:
    out, stdout, elapsed = quick_run
    for name in PLOTS:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name
    summary = (out / "SUMMARY.md").read_text()
    for heading in ("## Setup", "## Headline", "## Where hybridgraph is slower than a peer",
                    "## Skipped", "copy_bandwidth_gbs", "Ablation", "Throughput", "IPC"):
        assert heading in summary, heading
    assert "coverage" in summary.split("## Skipped")[1]   # GPU-only, said so with a reason
    assert "graph and hybrid" in summary
    assert summary in stdout
    assert elapsed < 600, f"bench all --quick took {elapsed:.0f} s"


def test_summarize() -> None:
    s = summarize([1.0, 2.0, 3.0, 4.0, 100.0])
    assert s["median"] == 3.0 and s["min"] == 1.0 and s["max"] == 100.0 and s["n"] == 5
    assert s["mean"] == pytest.approx(22.0) and s["p99"] > s["p90"] > s["median"]
    assert math.isnan(summarize([])["median"])


def test_prompts_same_everywhere_and_avoid_special_ids() -> None:
    a = make_prompt(50, 259)
    assert a == make_prompt(50, 259) and len(a) == 50 and min(a) >= 3 and max(a) < 259
    assert a != make_prompt(50, 259, seed=1)


def _results(ours_ttft: float, ours_dec: float, peer_ttft: float, peer_dec: float) -> Results:
    res = Results({"decode_floor_ms": 1.0})
    t = Table("ttft", "", ["system", "prompt_len", "median_ms"])
    t.add("hybridgraph-hybrid", 10, ours_ttft)
    d = Table("decode", "", ["system", "context", "mean_ms"])
    d.add("hybridgraph-hybrid", "all", ours_dec)
    pt = Table("peers_ttft", "", ["system", "prompt_len", "median_ms"])
    pt.add("hf-static", 10, peer_ttft)
    pd = Table("peers_decode", "", ["system", "ms_per_token"])
    pd.add("hf-static", peer_dec)
    res.add(t, d, pt, pd)
    return res


def test_slower_than_peer_is_computed_not_assumed() -> None:
    assert slower_than_peers(_results(5.0, 6.0, 9.0, 8.0)) == []
    lines = slower_than_peers(_results(12.0, 9.0, 6.0, 8.0))
    assert len(lines) == 2
    assert "TTFT" in lines[0] and "hf-static" in lines[0] and "2.00x" in lines[0]
    assert "Decode" in lines[1] and "1.12x" in lines[1]


def test_slower_than_peer_covers_other_modes() -> None:
    res = _results(5.0, 6.0, 9.0, 8.0)
    at = Table("ablation_ttft", "", ["mode", "prompt_len", "median_ms"])
    at.add("hybrid", 10, 5.0)
    at.add("eager", 10, 20.0)
    ad = Table("ablation_decode", "", ["mode", "ms_per_token"])
    ad.add("hybrid", 6.0)
    ad.add("eager", 30.0)
    res.add(at, ad)
    lines = slower_than_peers(res)
    assert len(lines) == 2 and all("hybridgraph-eager" in line for line in lines)


def test_ablation_steps_through_the_kernel_choices_on_cuda() -> None:
    from hybridgraph.bench.config import BenchConfig
    from hybridgraph.bench.latency import ablation_variants

    cfg = BenchConfig(modes=["eager", "jit", "graph", "hybrid"])
    rows = ablation_variants(cfg)
    assert rows[0] == ("hybrid", "hybrid (kernels auto)", {})   # built already: first
    assert [label for _, label, _ in rows[1:]] == [
        "eager", "jit", "graph", "hybrid +inductor", "hybrid +triton", "hybrid +triton +pdl"]
    assert rows[-1][2] == {"kernels": "triton", "pdl": True}
