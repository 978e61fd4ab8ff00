"""The `ipc` suite: a real server process, and the overhead its socket adds per request
(client-observed minus server-side latency), measured by hybridgraph.bench.ipc."""

from __future__ import annotations

import math
import os
import tempfile
from typing import Any

from hybridgraph.bench.config import BenchConfig
from hybridgraph.bench.engines import free_memory
from hybridgraph.bench.table import Table


class SuiteUnavailable(RuntimeError):
    """A suite that cannot run here; the message says why (recorded as skipped)."""


def _server_args(cfg: BenchConfig) -> list[str]:
    return ["--device", cfg.device, "--dtype", cfg.dtype, "--max-seq-len", str(cfg.max_seq_len)]


def ipc_suite(cfg: BenchConfig) -> list[Table]:
    try:
        from hybridgraph.bench.ipc import measure_http, measure_ipc
        from hybridgraph.server.launch import ServerProcess
    except ImportError as e:
        raise SuiteUnavailable(f"the server or hybridgraph.bench.ipc is not available ({e})") \
            from None
    free_memory()
    with tempfile.TemporaryDirectory(prefix="hg-bench-") as tmp:
        sock = os.path.join(tmp, "server.sock")
        # A 7B server captures its graphs before it says ready: allow it the time.
        # Both fronts on one server: the socket's numbers, then HTTP's, same engine.
        with ServerProcess(sock, model=cfg.model, extra=_server_args(cfg),
                           ready_timeout_s=900.0, http="127.0.0.1:0") as srv:
            try:
                r: dict[str, Any] = dict(measure_ipc(srv.socket_path, cfg.ipc_requests))
                assert srv.http_url is not None, "the server did not report its HTTP address"
                r.update(measure_http(srv.http_url, cfg.ipc_requests))
            except Exception as e:  # the server's log explains more than the client's error
                # A failed measurement is a failure (FAILED in the summary), not a skip.
                raise RuntimeError(f"measure_ipc failed: {type(e).__name__}: {e}\n"
                                   f"{srv.log()[-2000:]}") from e
    n = int(r.pop("n", cfg.ipc_requests))
    t = Table("ipc", f"IPC overhead: {n} one-token requests through a server process "
                     f"({cfg.default_mode} engine)",
              ["metric", "median_ms", "p99_ms"])
    # measure_ipc reports <what>_median_ms / <what>_p99_ms pairs; keep any it adds later.
    for what in dict.fromkeys(k.rsplit("_", 2)[0] for k in r if k.endswith("_median_ms")):
        t.add(what, float(r.get(f"{what}_median_ms", math.nan)),
              float(r.get(f"{what}_p99_ms", math.nan)))
    t.notes.append("ipc = client-observed latency - server-side latency, per request; "
                   "*_added = client-observed latency - the engine's own time (its TTFT), "
                   "per request. http_* go through the OpenAI HTTP front (keep-alive, JSON).")
    return [t]
