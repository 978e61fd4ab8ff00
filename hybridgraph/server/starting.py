"""While the model loads (minutes for a 7B with its graphs), the HTTP port is already bound:
answer on it, 503 to everything, so a health check hears "starting" instead of waiting on
an unaccepted connection. A stdlib server on a thread, on the same listening socket, shut
down (the socket kept) before the real front takes the socket over.
"""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_BODY = {"/health": {"status": "starting"}}
_ERROR = {"error": {"message": "the server is starting (loading the model); retry later",
                    "type": "server_error", "param": None, "code": "starting"}}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _answer(self) -> None:
        body = json.dumps(_BODY.get(self.path, _ERROR)).encode()
        self.send_response(503)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.send_header("retry-after", "5")
        self.send_header("connection", "close")  # the real front answers the next one
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _answer

    def log_message(self, format: str, *args: object) -> None:
        pass


class StartingResponder:
    def __init__(self, sock: socket.socket) -> None:
        self.httpd = ThreadingHTTPServer(sock.getsockname()[:2], _Handler,
                                         bind_and_activate=False)
        self.httpd.socket.close()
        self.httpd.socket = sock  # already bound and listening
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={
            "poll_interval": 0.05}, name="hybridgraph-starting", daemon=True)

    def __enter__(self) -> StartingResponder:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()  # stops accepting; the listening socket stays open
        self.thread.join()
