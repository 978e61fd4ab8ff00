"""The HTTP front's generate routes: an OpenAI body -> a GenerateRequest on the engine
worker -> one JSON response, or server-sent events (`data: {...}\\n\\n` ... `data: [DONE]`).

A client that goes away cancels its request: a task waits on the ASGI `http.disconnect`
and cancels the engine job at once (queued jobs are skipped, running ones stop at their
next token), so its slot frees without anyone reading the stream. Slots count requests
until the worker is done with them, not until the client hangs up.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from hybridgraph.request import RequestError, SamplingParams
from hybridgraph.server.openai_schema import (
    BadRequest,
    ChatRequest,
    CompletionRequest,
    Shapes,
    error_body,
    parse,
)
from hybridgraph.server.protocol import (
    BUSY,
    INTERNAL,
    SHUTTING_DOWN,
    GenerateRequest,
    ProtocolError,
)
from hybridgraph.server.submit import ErrorEvent, RequestStream, ResultEvent, TokenEvent
from hybridgraph.text import validate_stop

if TYPE_CHECKING:
    from hybridgraph.server.server import Server

_STATUS = {BUSY: 429, SHUTTING_DOWN: 503, INTERNAL: 500}
_SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"),
                (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]


class HttpError(Exception):
    def __init__(self, status: int, message: str, param: str | None, code: str,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = \
            status, message, param, code, kind

    def response(self) -> Response:
        return json_response(error_body(self.message, self.param, self.code, self.kind),
                             self.status)


def json_response(obj: Any, status: int = 200, headers: dict[str, str] | None = None
                  ) -> Response:
    return Response(_dumps(obj), status, headers, media_type="application/json")


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


class Completions:
    def __init__(self, server: Server, model_id: str, max_streams: int) -> None:
        self.server, self.model_id, self.max_streams = server, model_id, max_streams
        self.active = 0  # generate requests submitted and not yet done by the worker
        self._ids = itertools.count()
        self._prefix = os.urandom(4).hex()

    async def completion(self, request: Request, body: bytes, t_recv: float) -> ASGIApp:
        req: CompletionRequest = _checked(CompletionRequest, body)
        self._check_model(req.model)
        prompt = _bad_request(req.one_prompt)
        max_new, field = req.max_new_tokens()
        gen = self._generate_request(req, max_new, prompt if isinstance(prompt, list) else None,
                                     prompt if isinstance(prompt, str) else None)
        return await self._run(request, req, gen, field, "prompt", t_recv, chat=False)

    async def chat(self, request: Request, body: bytes, t_recv: float) -> ASGIApp:
        req: ChatRequest = _checked(ChatRequest, body)
        self._check_model(req.model)
        # Rendered (by the model's template, off the loop) before submitting, to size the
        # default max_tokens: the room the prompt leaves in the cache.
        try:
            ids = await self.server.render_chat([m.as_template_input() for m in req.messages])
        except RequestError as e:
            raise HttpError(400, str(e), "messages", "invalid_value") from None
        max_new, field = req.max_new_tokens()
        if max_new is None:
            max_new = max(1, self.server.engine.max_seq_len - len(ids))
        gen = self._generate_request(req, max_new, ids, None)
        return await self._run(request, req, gen, field, "messages", t_recv, chat=True)

    # ------------------------------------------------------------------ submission

    def _check_model(self, model: str) -> None:
        if model != self.model_id:
            raise HttpError(404, f"model {model[:100]!r} is not served here; this server "
                                 f"serves {self.model_id!r}", "model", "model_not_found")

    def _generate_request(self, req: CompletionRequest | ChatRequest, max_new: int,
                          prompt_ids: list[int] | None, text: str | None) -> GenerateRequest:
        rid = f"{'chatcmpl' if isinstance(req, ChatRequest) else 'cmpl'}-{self._prefix}" \
              f"{next(self._ids):x}"
        try:  # SamplingParams and validate_stop own the bounds; their fields are the API's
            sampling = SamplingParams(req.temperature, req.top_k, req.top_p, req.seed)
            stop = validate_stop(req.stop_strings())
        except RequestError as e:
            raise HttpError(400, str(e), e.field, "invalid_value") from None
        return GenerateRequest(rid, prompt_ids, text, max_new_tokens=max_new,
                               sampling=sampling, stop_ids=req.stop_token_ids,
                               stream=req.stream, stop=stop, ignore_eos=req.ignore_eos)

    async def _run(self, request: Request, req: CompletionRequest | ChatRequest,
                   gen: GenerateRequest, max_field: str, prompt_field: str, t_recv: float,
                   chat: bool) -> ASGIApp:
        if self.active >= self.max_streams:
            raise HttpError(429, f"{self.active} requests in flight over HTTP, the most this "
                                 f"server takes (--http-max-streams); retry later", None,
                            "too_many_requests", "rate_limit_error")
        # Each HTTP connection is a peer in the fair queue: its remote address is all we
        # know of who it is, and --http-max-streams bounds how many turns HTTP can take.
        client = request.client
        peer = ("http", client.host, client.port) if client else ("http", id(request))
        stream = RequestStream(peer, on_done=self._release)
        fields = {"max_new_tokens": max_field, "prompt_ids": prompt_field,
                  "text": prompt_field, "stop_ids": "stop_token_ids"}
        self.active += 1  # held while the prompt is tokenized, so the bound holds
        try:
            await self.server.submit(gen, stream, t_recv)
        except ProtocolError as e:
            self.active -= 1
            raise _from_protocol(e.code, e.message, e.field, fields) from None
        except BaseException:
            self.active -= 1
            raise
        shapes = Shapes(str(gen.request_id), self.model_id, chat)
        if req.stream:
            return _EventStream(stream, shapes, req.include_usage, fields)
        return await _complete(request, stream, shapes, fields)

    def _release(self) -> None:
        self.active -= 1


async def _complete(request: Request, stream: RequestStream, shapes: Shapes,
                    fields: dict[str, str]) -> Response:
    watcher = asyncio.create_task(_cancel_on_disconnect(request.receive, stream))
    try:
        event = await stream.next()
        while isinstance(event, TokenEvent):  # not asked for; skipped should any come
            event = await stream.next()
    finally:
        watcher.cancel()
        if not stream.finished:  # this task was cancelled (uvicorn gave up on it)
            stream.cancel()
    if isinstance(event, ErrorEvent):
        return _from_protocol(event.code, event.message, event.field, fields).response()
    assert isinstance(event, ResultEvent)
    body = shapes.response(event.text or "", event.tokens, event.finish_reason,
                           event.prompt_len)
    return json_response(body, headers=_timing_headers(event))


def _timing_headers(r: ResultEvent) -> dict[str, str]:
    # For clients that measure what the front adds (bench/ipc.py): the server's time as
    # the socket reports it (arrival -> result), and the engine's own share.
    return {"x-hybridgraph-latency-ms": f"{r.latency_ms:.4f}",
            "x-hybridgraph-queue-ms": f"{r.queue_ms:.4f}",
            "x-hybridgraph-engine-ttft-ms": f"{r.engine_ttft_ms:.4f}"}


async def _cancel_on_disconnect(receive: Receive, stream: RequestStream) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    stream.cancel()


class _EventStream:
    """An ASGI response of server-sent events, one per token, then the finish, usage (if
    asked) and `data: [DONE]`."""

    def __init__(self, stream: RequestStream, shapes: Shapes, include_usage: bool,
                 fields: dict[str, str]) -> None:
        self.stream, self.shapes, self.include_usage = stream, shapes, include_usage
        self.fields = fields

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
        watcher = asyncio.create_task(_cancel_on_disconnect(receive, self.stream))
        try:
            async for data in self._events():
                # After a disconnect uvicorn drops what is sent; the job ends at its next
                # token, and we read on to its result so the slot is counted free.
                await send({"type": "http.response.body", "body": data, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            watcher.cancel()
            if not self.stream.finished:
                self.stream.cancel()

    async def _events(self) -> AsyncIterator[bytes]:
        shapes = self.shapes
        if shapes.chat:
            yield _sse(shapes.chunk("", [], None, role=True))
        async for event in self.stream:
            if isinstance(event, TokenEvent):
                yield _sse(shapes.chunk(event.text, [event.token], None))
            elif isinstance(event, ResultEvent):
                yield _sse(shapes.chunk("", [], event.finish_reason))
                if self.include_usage:
                    yield _sse(shapes.usage_chunk(event.prompt_len, len(event.tokens)))
            else:
                e = _from_protocol(event.code, event.message, event.field, self.fields)
                yield _sse(error_body(e.message, e.param, e.code, e.kind))
        yield b"data: [DONE]\n\n"


def _sse(obj: Any) -> bytes:
    return b"data: " + _dumps(obj) + b"\n\n"


def _checked(model: type, body: bytes) -> Any:
    req = _bad_request(lambda: parse(model, body))
    _bad_request(req.check_supported)
    return req


def _bad_request(fn: Any) -> Any:
    try:
        return fn()
    except BadRequest as e:
        raise HttpError(400, e.message, e.param, e.code) from None


def _from_protocol(code: str, message: str, field: str | None,
                   fields: dict[str, str]) -> HttpError:
    """A server refusal in the API's words: its field names become the request's."""
    param = fields.get(field, field) if field is not None else None
    if field is not None and param != field:
        message = message.replace(field, param)  # type: ignore[arg-type]
    status = _STATUS.get(code, 400)
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return HttpError(status, message, param, code, kind)
