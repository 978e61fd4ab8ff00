"""While the model loads, the bound HTTP port answers 503 "starting", then hands over."""

from __future__ import annotations

import http.client
import json
import socket

from hybridgraph.server.http import bind_tcp
from hybridgraph.server.starting import StartingResponder


def get(port: int, method: str, path: str) -> tuple[int, dict]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        c.request(method, path, b"{}" if method == "POST" else None)
        r = c.getresponse()
        return r.status, json.loads(r.read())
    finally:
        c.close()


def test_503_while_starting_then_the_socket_is_handed_over() -> None:
    sock = bind_tcp("127.0.0.1", 0)
    port = sock.getsockname()[1]
    try:
        with StartingResponder(sock):
            assert get(port, "GET", "/health") == (503, {"status": "starting"})
            status, body = get(port, "POST", "/v1/completions")
            assert status == 503 and body["error"]["code"] == "starting"
        # Still listening, and nobody else answers: the next front accepts from the backlog.
        client = socket.create_connection(("127.0.0.1", port), timeout=10)
        conn, _ = sock.accept()
        conn.close()
        client.close()
    finally:
        sock.close()
