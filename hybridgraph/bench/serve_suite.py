"""The `serve` suite: N concurrent clients (1, 4, 16, 64) through a real server process,
with batching on (the scheduler, `--max-batch` = BenchConfig.serve_max_batch) and off
(`--max-batch 1`: one request at a time, first come first served), measured by
hybridgraph.bench.serve_load. Not part of `bench all`: name it (`hybridgraph bench serve`).
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

from hybridgraph.bench.config import BenchConfig
from hybridgraph.bench.engines import free_memory
from hybridgraph.bench.ipc_suite import SuiteUnavailable
from hybridgraph.bench.serve_load import measure_serve
from hybridgraph.bench.table import Table
from hybridgraph.model.config import PRESETS, ModelConfig, preset

COLUMNS = ["batching", "clients", "requests", "tokens", "tokens_per_s", "ttft_median_ms",
           "ttft_p99_ms", "token_median_ms", "token_p99_ms", "worst_client_token_median_ms",
           "errors"]


def _vocab(model: str) -> int:
    cfg = preset(model) if model in PRESETS else ModelConfig.from_json(Path(model) / "config.json")
    return cfg.vocab_size


def serve_suite(cfg: BenchConfig) -> list[Table]:
    try:
        from hybridgraph.server.launch import ServerProcess
    except ImportError as e:
        raise SuiteUnavailable(f"the server is not available ({e})") from None
    vocab = _vocab(cfg.model)
    t = Table("serve", f"Serving N concurrent streaming clients, each sending "
                       f"max({cfg.serve_requests}, {cfg.serve_min_requests}/N) requests in turn, "
                       f"prompt/new-token mix {list(cfg.serve_mix)}", list(COLUMNS))
    for batching, max_batch in (("on", cfg.serve_max_batch), ("off", 1)):
        free_memory()
        with tempfile.TemporaryDirectory(prefix="hg-bench-") as tmp:
            sock = os.path.join(tmp, "server.sock")
            extra = ["--device", cfg.device, "--dtype", cfg.dtype, "--max-seq-len",
                     str(cfg.serve_max_seq_len), "--max-batch", str(max_batch)]
            with ServerProcess(sock, model=cfg.model, extra=extra, ready_timeout_s=1800.0) as srv:
                for n in cfg.serve_clients:
                    per_client = max(cfg.serve_requests, math.ceil(cfg.serve_min_requests / n))
                    try:
                        r = measure_serve(srv.socket_path, n, per_client, cfg.serve_mix, vocab)
                    except Exception as e:
                        raise RuntimeError(f"serve load with {n} clients failed: "
                                           f"{type(e).__name__}: {e}\n{srv.log()[-2000:]}") from e
                    if r["errors"]:
                        raise RuntimeError(f"{len(r['errors'])} failed requests with {n} "
                                           f"clients, e.g. {r['errors'][0]}")
                    t.add(batching, n, *(r[c] for c in COLUMNS[2:-1]), len(r["errors"]))
    t.notes += _checks(t)
    t.notes.append(f"Batching on: --max-batch {cfg.serve_max_batch} (more clients wait their "
                   f"turn for a row); off: --max-batch 1.")
    t.notes.append("Times on the client. per-token: gaps between consecutive streamed tokens "
                   "of a request; worst client: the highest per-client median gap.")
    return [t]


def _checks(t: Table) -> list[str]:
    """The issue's targets, computed from this run: throughput at 16 clients vs one client,
    and the per-token latency each of those 16 sees vs a lone client's."""
    rows = {(r["batching"], r["clients"]): r for r in t.records()}
    one = rows.get(("on", 1))
    out = []
    for n in sorted({c for _, c in rows}):
        r = rows.get(("on", n))
        if one is None or r is None or n == 1:
            continue
        speedup = r["tokens_per_s"] / one["tokens_per_s"]
        slow = r["worst_client_token_median_ms"] / one["token_median_ms"]
        off = rows.get(("off", n))
        vs_off = f"; {r['tokens_per_s'] / off['tokens_per_s']:.2f}x batching off" \
            if off is not None and off["tokens_per_s"] > 0 else ""
        out.append(f"{n} clients, batching on: {speedup:.2f}x the one-client throughput{vs_off}; "
                   f"worst client's median per-token latency {slow:.2f}x a lone client's"
                   + ("" if math.isfinite(slow) else " (no tokens)"))
    return out
