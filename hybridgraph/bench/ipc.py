"""IPC overhead of the graph server: client-observed minus server-side latency.

Each request generates one token, so the engine's share is small and steady; the
difference per request is what the socket, the framing and the two processes' wake-ups
cost. The server stamps `latency_ms` from the moment a request's frame is fully read to
just before its reply is encoded, so the difference holds: the client's encode and send,
the kernel's hand-over both ways, the server's read and decode, the reply's encode and
write, and the client's read and decode.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from hybridgraph.server.client import Client

PROMPT = [1, 72, 101, 108]  # short, and inside every preset's vocabulary (tiny has 259)


def percentile(xs: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = (len(s) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def measure_ipc(socket_path: str, n: int = 1000, warmup: int = 50) -> dict[str, Any]:
    """Send n one-token generate requests; median and P99 (ms) of client-observed latency,
    server-side latency and their per-request difference (the IPC overhead)."""
    client_ms: list[float] = []
    server_ms: list[float] = []
    with Client(socket_path) as client:
        for i in range(warmup + n):
            t0 = time.perf_counter()
            reply = client.generate(prompt_ids=PROMPT, max_new_tokens=1, seed=0)
            elapsed = (time.perf_counter() - t0) * 1e3
            if i >= warmup:
                client_ms.append(elapsed)
                server_ms.append(float(reply["latency_ms"]))
    ipc_ms = [c - s for c, s in zip(client_ms, server_ms, strict=True)]
    return {
        "n": n,
        "client_median_ms": percentile(client_ms, 50), "client_p99_ms": percentile(client_ms, 99),
        "server_median_ms": percentile(server_ms, 50), "server_p99_ms": percentile(server_ms, 99),
        "ipc_median_ms": percentile(ipc_ms, 50), "ipc_p99_ms": percentile(ipc_ms, 99),
    }
