"""OpenAI-compatible HTTP front (Starlette on uvicorn), beside the Unix socket, one engine.

    POST /v1/completions        POST /v1/chat/completions     (stream: true -> SSE)
    GET  /v1/models             GET  /metrics (Prometheus)    GET /health (no key needed)

It runs on the server's own event loop and submits to the same engine worker as the
socket (Server.submit), so both fronts queue together and SIGTERM drains both. Access
control: loopback by default; with an API key every route but /health wants
`Authorization: Bearer <key>` (compared in constant time) and answers 401 without it.
Bodies, concurrent requests and max_tokens are bounded (413, 429, 400). Errors are
OpenAI-shaped: {"error": {"message", "type", "param", "code"}}, the param naming the field.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from hybridgraph.server.completions import Completions, HttpError, json_response
from hybridgraph.server.openai_schema import error_body

if TYPE_CHECKING:
    from hybridgraph.server.server import Server

log = logging.getLogger("hybridgraph.server")

API_KEY_ENV = "HYBRIDGRAPH_API_KEY"
DEFAULT_HOST = "127.0.0.1"  # loopback unless told otherwise: the API key is optional
DEFAULT_MAX_BODY_BYTES = 1 << 20
DEFAULT_MAX_STREAMS = 64
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(frozen=True)
class HttpOptions:
    host: str = DEFAULT_HOST
    port: int = 8000
    api_key: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_streams: int = DEFAULT_MAX_STREAMS  # generate requests in flight over HTTP
    model_id: str | None = None             # what /v1/models lists; default: the model's name


def parse_address(spec: str) -> tuple[str, int]:
    """'HOST:PORT', ':PORT' or 'PORT' (loopback), '[::1]:PORT' -> (host, port)."""
    host, sep, port = spec.rpartition(":")
    if not sep:
        host, port = "", spec
    host = host.strip("[]") or DEFAULT_HOST
    if not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"--http {spec!r}: expected HOST:PORT with a port in [0, 65535]")
    return host, int(port)


def bind_tcp(host: str, port: int) -> socket.socket:
    """A listening socket, bound now, so a busy port fails before the model loads."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        raise ValueError(f"cannot resolve HTTP address {host!r}: {e}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(1024)
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {e}") from None
    return sock


class _Uvicorn(uvicorn.Server):
    """uvicorn without its own signal handlers: the Server's loop owns SIGTERM and drains
    both fronts before it stops this one."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class _BearerAuth:
    """Pure ASGI (no per-request task): every route but /health needs the key."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.digest = hashlib.sha256(api_key.encode()).digest()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] != "/health" and not self._ok(scope):
            body = json.dumps(error_body("a valid API key is required: send "
                                         "'Authorization: Bearer <key>'", None,
                                         "invalid_api_key", "authentication_error")).encode()
            await send({"type": "http.response.start", "status": 401,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"www-authenticate", b"Bearer"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)

    def _ok(self, scope: Scope) -> bool:
        given = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                given = value
                break
        scheme, _, token = given.partition(b" ")
        # Digests of equal length: the comparison leaks neither the key nor its length.
        return scheme.lower() == b"bearer" and hmac.compare_digest(
            hashlib.sha256(token.strip()).digest(), self.digest)


class HttpFront:
    def __init__(self, server: Server, options: HttpOptions,
                 sock: socket.socket | None = None) -> None:
        self.server, self.options, self.sock = server, options, sock
        model_id = options.model_id or server.engine.config.name
        self.model_id = model_id
        self.completions = Completions(server, model_id, options.max_streams)
        self.uv: _Uvicorn | None = None
        self.task: asyncio.Task[None] | None = None
        self.app = self._build_app()

    # ------------------------------------------------------------------ lifecycle

    @property
    def where(self) -> str:
        host, port = self.sock.getsockname()[:2] if self.sock is not None else \
            (self.options.host, self.options.port)
        return f"http://{f'[{host}]' if ':' in host else host}:{port}"

    async def start(self) -> None:
        if self.sock is None:
            self.sock = bind_tcp(self.options.host, self.options.port)
        config = uvicorn.Config(self.app, log_config=None, log_level="warning",
                                access_log=False, lifespan="off", server_header=False,
                                timeout_graceful_shutdown=2)
        self.uv = _Uvicorn(config)
        self.task = asyncio.get_running_loop().create_task(self.uv.serve(sockets=[self.sock]))
        while not self.uv.started:  # startup is quick; a failure ends the task
            if self.task.done():
                self.task.result()
                raise RuntimeError("the HTTP front stopped while starting")
            await asyncio.sleep(0.002)
        if self.options.api_key is None and not _is_loopback(self.sock):
            log.warning("HTTP front on %s without an API key: anyone who can reach it may "
                        "use it", self.where)

    async def stop(self) -> None:
        if self.uv is not None and self.task is not None:
            self.uv.should_exit = True
            await self.task

    # ------------------------------------------------------------------------ app

    def _build_app(self) -> ASGIApp:
        gen = self._generation
        routes = [
            Route("/health", self.health, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/metrics", self.metrics, methods=["GET"]),
            Route("/v1/completions", gen(self.completions.completion), methods=["POST"]),
            Route("/v1/chat/completions", gen(self.completions.chat), methods=["POST"]),
        ]
        app = Starlette(routes=routes, exception_handlers={
            HttpError: _http_error, HTTPException: _starlette_error, Exception: _internal})
        key = self.options.api_key
        return _BearerAuth(app, key) if key else app

    async def health(self, request: Request) -> Response:
        if self.server.stopping:
            return json_response({"status": "draining"}, 503)
        if not self.server.ready.is_set():
            return json_response({"status": "starting"}, 503)
        return json_response({"status": "ok"})

    async def models(self, request: Request) -> Response:
        engine = self.server.engine
        return json_response({"object": "list", "data": [{
            "id": self.model_id, "object": "model", "created": int(self.server.t_start),
            "owned_by": "hybridgraph", "max_model_len": engine.max_seq_len}]})

    async def metrics(self, request: Request) -> Response:
        return Response(self.server.metrics.exposition(), media_type=PROMETHEUS_TEXT)

    def _generation(self, handler: Callable[[Request, bytes, float], Awaitable[ASGIApp]]
                    ) -> Callable[[Request], Awaitable[ASGIApp]]:
        async def route(request: Request) -> ASGIApp:
            t_recv = time.perf_counter()
            try:
                body = await self._body(request)
                return await handler(request, body, t_recv)
            except HttpError:
                self.server.metrics.refused("http")
                raise
        return route

    async def _body(self, request: Request) -> bytes:
        """The body, refused (413) once it passes the limit: never buffered whole first."""
        limit = self.options.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise HttpError(413, f"request body of {declared} bytes exceeds the limit of "
                                 f"{limit}", None, "body_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise HttpError(413, f"request body exceeds the limit of {limit} bytes",
                                None, "body_too_large")
            chunks.append(chunk)
        return b"".join(chunks)


def http_front(server: Server, args: argparse.Namespace, sock: socket.socket) -> HttpFront:
    """The front `hybridgraph serve --http ...` asks for, on a socket bound already."""
    host, port = parse_address(args.http)
    if args.http_max_body_bytes < 1 or args.http_max_streams < 1:
        raise ValueError("--http-max-body-bytes and --http-max-streams must be >= 1")
    key = args.api_key or os.environ.get(API_KEY_ENV) or None
    return HttpFront(server, HttpOptions(host, port, key, args.http_max_body_bytes,
                                         args.http_max_streams, args.served_model_name), sock)


def _is_loopback(sock: socket.socket) -> bool:
    host = sock.getsockname()[0]
    return host.startswith("127.") or host in ("::1", "localhost")


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HttpError)
    return exc.response()


async def _starlette_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return json_response(error_body(f"{request.method} {request.url.path}: {exc.detail}",
                                    None, code), exc.status_code)


async def _internal(request: Request, exc: Exception) -> Response:
    log.error("HTTP %s %s failed", request.method, request.url.path, exc_info=exc)
    return json_response(error_body(f"internal error: {type(exc).__name__}: {exc}", None,
                                    "internal", "server_error"), 500)

