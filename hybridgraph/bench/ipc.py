"""IPC overhead of the graph server's fronts: client-observed minus server-side latency.

Each request generates one token, so the engine's share is small and steady; the
difference per request is what the socket, the framing and the two processes' wake-ups
cost. The server stamps `latency_ms` from the moment a request's frame is fully read to
just before its reply is encoded, so the difference holds: the client's encode and send,
the kernel's hand-over both ways, the server's read and decode, the reply's encode and
write, and the client's read and decode.

Both fronts are also measured against the engine's own time (`*_added`: client-observed
minus the engine's TTFT, which for a one-token request is all the engine does): that
counts everything the front adds, the hand-over to the engine thread and back included.
The HTTP front is measured like the socket, over one keep-alive connection with a minimal
client (raw HTTP/1.1, JSON), reading the server's times from response headers.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

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
    engine_ms: list[float] = []
    with Client(socket_path) as client:
        for i in range(warmup + n):
            t0 = time.perf_counter()
            reply = client.generate(prompt_ids=PROMPT, max_new_tokens=1, seed=0)
            elapsed = (time.perf_counter() - t0) * 1e3
            if i >= warmup:
                client_ms.append(elapsed)
                server_ms.append(float(reply["latency_ms"]))
                engine_ms.append(float(reply["engine_ttft_ms"]))
    return {"n": n, **_summary("", client_ms, server_ms, engine_ms, "ipc", "socket_added")}


def measure_http(url: str, n: int = 1000, warmup: int = 50,
                 api_key: str | None = None) -> dict[str, Any]:
    """The same one-token requests through the HTTP front at `url` (http://host:port):
    http_client, http_server, http_ipc (client - server) and http_added (client - engine)."""
    u = urlsplit(url)
    auth = f"authorization: Bearer {api_key}\r\n".encode() if api_key else b""
    client_ms: list[float] = []
    server_ms: list[float] = []
    engine_ms: list[float] = []
    with _HttpConnection(u.hostname or "127.0.0.1", u.port or 80, auth) as conn:
        _, _, models = conn.request(b"GET", b"/v1/models", b"")
        model = json.loads(models)["data"][0]["id"]
        body = json.dumps({"model": model, "prompt": PROMPT, "max_tokens": 1,
                           "temperature": 0, "seed": 0}).encode()
        for i in range(warmup + n):
            t0 = time.perf_counter()
            status, headers, reply = conn.request(b"POST", b"/v1/completions", body)
            json.loads(reply)  # the client's decode counts, as msgpack's does
            elapsed = (time.perf_counter() - t0) * 1e3
            if status != 200:
                raise RuntimeError(f"HTTP {status}: {reply[:500]!r}")
            if i >= warmup:
                client_ms.append(elapsed)
                server_ms.append(float(headers.get(b"x-hybridgraph-latency-ms", b"nan")))
                engine_ms.append(float(headers.get(b"x-hybridgraph-engine-ttft-ms", b"nan")))
    return {"n": n, **_summary("http_", client_ms, server_ms, engine_ms, "http_ipc",
                               "http_added")}


class _HttpConnection:
    """A minimal keep-alive HTTP/1.1 client (Content-Length bodies only): what the front
    adds must not hide behind a client library's own parsing, as the socket's client is
    a thin one too."""

    def __init__(self, host: str, port: int, extra_headers: bytes) -> None:
        self.sock = socket.create_connection((host, port), timeout=60)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.head = b"host: " + host.encode() + b"\r\n" + extra_headers
        self.buf = b""

    def __enter__(self) -> _HttpConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def request(self, method: bytes, path: bytes, body: bytes
                ) -> tuple[int, dict[bytes, bytes], bytes]:
        self.sock.sendall(method + b" " + path + b" HTTP/1.1\r\n" + self.head +
                          b"content-type: application/json\r\ncontent-length: " +
                          str(len(body)).encode() + b"\r\n\r\n" + body)
        while b"\r\n\r\n" not in self.buf:
            self._recv()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip()
                   for k, _, v in (line.partition(b":") for line in lines[1:])}
        size = int(headers[b"content-length"])
        while len(self.buf) < size:
            self._recv()
        reply, self.buf = self.buf[:size], self.buf[size:]
        return status, headers, reply

    def _recv(self) -> None:
        chunk = self.sock.recv(1 << 16)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        self.buf += chunk


def _summary(prefix: str, client_ms: list[float], server_ms: list[float],
             engine_ms: list[float], ipc: str, added: str) -> dict[str, float]:
    """Median and P99 of each latency and of the per-request differences."""
    series = {f"{prefix}client": client_ms, f"{prefix}server": server_ms,
              ipc: [c - s for c, s in zip(client_ms, server_ms, strict=True)],
              added: [c - e for c, e in zip(client_ms, engine_ms, strict=True)]}
    out: dict[str, float] = {}
    for name, xs in series.items():
        out[f"{name}_median_ms"] = percentile(xs, 50)
        out[f"{name}_p99_ms"] = percentile(xs, 99)
    return out
