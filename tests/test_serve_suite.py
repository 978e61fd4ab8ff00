"""`hybridgraph bench serve --quick`: two real server processes (batching on and off), the
tiny model on the CPU, 1 and 4 concurrent streaming clients; and the target checks."""

from __future__ import annotations

from pathlib import Path

from hybridgraph.bench.report import read_csv
from hybridgraph.bench.serve_suite import COLUMNS, _checks
from hybridgraph.bench.table import Table
from hybridgraph.cli import main


def test_bench_serve_quick(tmp_path: Path) -> None:
    out = tmp_path / "serve"
    assert main(["bench", "serve", "--quick", "--out", str(out)]) == 0
    _, rows = read_csv(out / "serve.csv")
    assert {(r["batching"], int(r["clients"])) for r in rows} == {
        (b, n) for b in ("on", "off") for n in (1, 4)}
    for r in rows:
        n = int(r["clients"])
        per_client = 4 if n == 1 else 2    # at least 4 requests in all, 2 per client
        assert int(r["requests"]) == per_client * n and int(r["errors"]) == 0
        # the quick mix: requests of 12 and 6 new tokens, alternating per client
        assert int(r["tokens"]) == 9 * per_client * n
        assert float(r["tokens_per_s"]) > 0 and float(r["ttft_median_ms"]) > 0
        assert float(r["token_p99_ms"]) >= float(r["token_median_ms"]) > 0
    png = (out / "serve.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert "batching on" in (out / "SUMMARY.md").read_text()


def test_checks_compare_against_the_lone_client() -> None:
    t = Table("serve", "", list(COLUMNS))
    t.add("on", 1, 4, 400, 100.0, 10.0, 12.0, 6.0, 7.0, 6.0, 0)
    t.add("on", 16, 64, 6400, 1200.0, 30.0, 90.0, 7.0, 9.0, 7.5, 0)
    t.add("off", 16, 64, 6400, 110.0, 900.0, 2000.0, 6.0, 7.0, 6.2, 0)
    (line,) = _checks(t)
    assert line.startswith("16 clients") and "12.00x the one-client" in line
    assert "10.91x batching off" in line and "1.25x a lone client's" in line
