"""The OpenAI HTTP front as a real process: `hybridgraph serve --socket S --http 127.0.0.1:0`.

One server (both fronts, one engine) is shared by the module; the drain test starts its
own, HTTP only. Requests go through the official `openai` client where that is what is
checked, and through raw sockets where bytes on the wire are.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
from prometheus_client.parser import text_string_to_metric_families

from hybridgraph.server.client import Client
from hybridgraph.server.launch import ServerProcess

openai = pytest.importorskip("openai")

KEY = "test-key-7f3a"
MAX_BODY = 65536
MAX_STREAMS = 2
PROMPT = [1, 72, 101, 108, 108, 111]
N_NEW = 24
LONG = 1900  # tokens: a stream that would run for seconds unless cancelled
TEMPLATE = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}<assistant>"
CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    d = tempfile.mkdtemp(prefix="hg", dir="/tmp")
    extra = ["--device", "cpu", "--api-key", KEY, "--http-max-body-bytes", str(MAX_BODY),
             "--http-max-streams", str(MAX_STREAMS), "--chat-template", TEMPLATE]
    try:
        with ServerProcess(os.path.join(d, "s.sock"), "tiny", extra,
                           http="127.0.0.1:0") as srv:
            assert srv.http_url is not None
            yield srv
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def engine():
    from hybridgraph.engine import Engine

    return Engine.load("tiny", device="cpu", chat_template=TEMPLATE)


@pytest.fixture(scope="module")
def client(server: ServerProcess):
    return openai.OpenAI(base_url=f"{server.http_url}/v1", api_key=KEY, max_retries=0,
                         timeout=60)


def conn(server: ServerProcess) -> http.client.HTTPConnection:
    u = urlsplit(server.http_url)
    return http.client.HTTPConnection(u.hostname, u.port, timeout=60)


def call(server: ServerProcess, method: str, path: str, body: bytes | None = None,
         key: str | None = KEY) -> tuple[int, dict[str, str], bytes]:
    c = conn(server)
    headers = {"content-type": "application/json"}
    if key is not None:
        headers["authorization"] = f"Bearer {key}"
    try:
        c.request(method, path, body, headers)
        r = c.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        c.close()


def completion(**kw: Any) -> bytes:
    return json.dumps({"model": "tiny", "prompt": PROMPT, "max_tokens": N_NEW,
                       "temperature": 0, **kw}).encode()


def scrape(server: ServerProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, _, body = call(server, "GET", "/metrics")
    assert status == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(body.decode()) for s in fam.samples}


def served(server: ServerProcess, engine) -> None:
    """The server still answers a good request, correctly."""
    status, _, body = call(server, "POST", "/v1/completions", completion())
    assert status == 200, body
    assert json.loads(body)["choices"][0]["token_ids"] == \
        engine.generate(PROMPT, N_NEW).tokens


# ------------------------------------------------------------------ the openai client

def test_openai_client_gets_the_engines_tokens_and_text(server, engine, client) -> None:
    from hybridgraph.engine import SamplingParams

    want = engine.generate(PROMPT, N_NEW)
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=N_NEW, temperature=0)
    choice = r.choices[0]
    assert choice.model_extra["token_ids"] == want.tokens
    assert choice.text == engine.tokenizer.decode(want.tokens)
    assert choice.finish_reason == want.finish_reason
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(PROMPT), len(want.tokens))

    # a text prompt, sampled with a seed and top_k (an extension, through extra_body)
    ids = engine.tokenizer.encode("Hello there")
    want = engine.generate(ids, N_NEW, SamplingParams(0.9, 40, 0.95, 1234))
    r = client.completions.create(model="tiny", prompt="Hello there", max_tokens=N_NEW,
                                  temperature=0.9, top_p=0.95, seed=1234,
                                  extra_body={"top_k": 40})
    assert r.choices[0].model_extra["token_ids"] == want.tokens
    assert r.choices[0].text == engine.tokenizer.decode(want.tokens)
    assert r.usage.prompt_tokens == len(ids)


def test_openai_client_stream_gets_the_same(server, engine, client) -> None:
    want = engine.generate(PROMPT, N_NEW)
    chunks = list(client.completions.create(model="tiny", prompt=PROMPT, max_tokens=N_NEW,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    texts = [c.choices[0].text for c in chunks if c.choices]
    ids = [t for c in chunks if c.choices for t in c.choices[0].model_extra["token_ids"]]
    assert ids == want.tokens
    assert "".join(texts) == engine.tokenizer.decode(want.tokens)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == want.finish_reason and not any(finishes[:-1])
    assert chunks[-1].usage.completion_tokens == len(want.tokens)
    assert chunks[-1].usage.prompt_tokens == len(PROMPT)


def test_sse_framing_is_exact(server) -> None:
    c = conn(server)
    c.request("POST", "/v1/completions", completion(stream=True, max_tokens=5),
              {"authorization": f"Bearer {KEY}", "content-type": "application/json"})
    r = c.getresponse()
    assert r.status == 200
    assert r.getheader("content-type").startswith("text/event-stream")
    body = r.read()
    c.close()
    assert body.endswith(b"\n\ndata: [DONE]\n\n")
    events = body.split(b"\n\n")
    assert events[-1] == b"" and events[-2] == b"data: [DONE]"
    for e in events[:-2]:
        assert e.startswith(b"data: {") and b"\n" not in e, e
        json.loads(e[len(b"data: "):])
    assert len(events) - 2 == 5 + 1  # one event per token, then the finish


def test_both_fronts_share_one_engine(server, engine) -> None:
    with Client(server.socket_path, timeout=60) as c:
        assert c.generate(prompt_ids=PROMPT, max_new_tokens=N_NEW)["tokens"] == \
            engine.generate(PROMPT, N_NEW).tokens
        assert any(f.startswith("http://") for f in c.status()["fronts"])


def test_models_lists_the_served_model(server) -> None:
    status, _, body = call(server, "GET", "/v1/models")
    assert status == 200
    assert [m["id"] for m in json.loads(body)["data"]] == ["tiny"]


# --------------------------------------------------------------------------- metrics

def test_metrics_parse_and_move(server, client) -> None:
    before = scrape(server)
    client.completions.create(model="tiny", prompt=PROMPT, max_tokens=3, temperature=0)
    call(server, "POST", "/v1/completions", b"{not json")
    with Client(server.socket_path, timeout=60) as c:  # the socket's requests count too
        c.generate(prompt_ids=PROMPT, max_new_tokens=3)
    after = scrape(server)

    def moved(name: str, **labels: str) -> float:
        k = (name, tuple(sorted(labels.items())))
        return after[k] - before[k]

    assert moved("hybridgraph_requests_total", front="http", outcome="length") == 1
    assert moved("hybridgraph_requests_total", front="http", outcome="refused") == 1
    assert moved("hybridgraph_ttft_seconds_count", front="http") == 1
    assert moved("hybridgraph_requests_total", front="socket", outcome="length") + \
        moved("hybridgraph_requests_total", front="socket", outcome="stop") == 1
    assert moved("hybridgraph_ttft_seconds_count", front="socket") == 1
    assert moved("hybridgraph_inter_token_seconds_count") >= 2
    for name in ("hybridgraph_queue_depth", "hybridgraph_graph_hits_total",
                 "hybridgraph_graph_fallbacks_total", "hybridgraph_graph_captures_total",
                 "hybridgraph_graph_bytes_held"):
        assert (name, ()) in after, name


# ---------------------------------------------------------------------- access control

@pytest.mark.parametrize("path", ["/v1/models", "/metrics", "/v1/completions", "/nowhere"])
@pytest.mark.parametrize("key", [None, "wrong-key", ""])
def test_a_wrong_or_missing_key_gets_401(server, path: str, key: str | None) -> None:
    status, headers, body = call(server, "POST" if "compl" in path else "GET", path,
                                 completion() if "compl" in path else None, key)
    assert status == 401, body
    assert headers["www-authenticate"] == "Bearer"
    assert json.loads(body)["error"]["code"] == "invalid_api_key"


def test_health_needs_no_key(server) -> None:
    status, _, body = call(server, "GET", "/health", key=None)
    assert (status, json.loads(body)) == (200, {"status": "ok"})


def test_the_openai_client_with_a_wrong_key_is_refused(server) -> None:
    bad = openai.OpenAI(base_url=f"{server.http_url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


# ------------------------------------------------------------------------ bad requests

BAD = [
    # (body, status, param, words the message must hold)
    (b"{not json", 400, None, "not valid JSON"),
    (b"[1, 2]", 400, None, "JSON object"),
    (completion(temperature="hot"), 400, "temperature", "temperature"),
    (completion(max_tokens=True), 400, "max_tokens", "max_tokens"),
    (completion(prompt={"a": 1}), 400, "prompt", "prompt"),
    (completion(foo=1, logit_bias={}), 400, "foo", "'foo', 'logit_bias'"),
    (completion(max_tokens=10**9), 400, "max_tokens", "max_tokens"),
    (completion(max_tokens=0), 400, "max_tokens", "max_tokens"),
    (completion(n=2), 400, "n", "n=1"),
    (completion(prompt=[1, 10**6]), 400, "prompt", "vocabulary"),
    (completion(prompt=["a", "b"]), 400, "prompt", "2 prompts"),
    (completion(top_p=0), 400, "top_p", "top_p"),
    (completion(stream_options={"include_usage": True}), 400, "stream_options", "stream"),
    (completion(model="gpt-4"), 404, "model", "gpt-4"),
    (json.dumps({"model": "tiny"}).encode(), 400, "prompt", "prompt"),
]


@pytest.mark.parametrize("body,status,param,words", BAD,
                         ids=[f"{i}-{b[:24]!r}" for i, b in enumerate(BAD)])
def test_bad_requests_are_named_and_the_next_is_served(server, engine, body: bytes,
                                                       status: int, param: str | None,
                                                       words: str) -> None:
    got, _, reply = call(server, "POST", "/v1/completions", body)
    assert got == status, reply
    err = json.loads(reply)["error"]
    assert err["param"] == param
    assert words in err["message"], err
    served(server, engine)


def test_an_oversized_body_gets_413(server, engine) -> None:
    body = completion(prompt="x" * MAX_BODY)
    got, _, reply = call(server, "POST", "/v1/completions", body)
    assert got == 413, reply
    assert str(MAX_BODY) in json.loads(reply)["error"]["message"]
    served(server, engine)


def test_chat_goes_through_the_template_and_matches_the_engine(server, engine, client) -> None:
    from hybridgraph.model.chat import chat_prompt_ids

    ids = chat_prompt_ids(engine.tokenizer, CHAT)
    want = engine.generate(ids, N_NEW)
    r = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=N_NEW,
                                       temperature=0)
    assert r.choices[0].model_extra["token_ids"] == want.tokens
    assert r.choices[0].message.content == engine.tokenizer.decode(want.tokens)
    assert r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(ids)
    chunks = list(client.chat.completions.create(model="tiny", messages=CHAT,
                                                 max_tokens=N_NEW, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == \
        engine.tokenizer.decode(want.tokens)
    assert chunks[-1].choices[0].finish_reason == want.finish_reason


def test_stop_strings_end_the_text_as_the_engine_does(server, engine, client) -> None:
    full = engine.tokenizer.decode(engine.generate(PROMPT, N_NEW, ignore_eos=True).tokens)
    stop = full[len(full) // 2]  # some character the text holds
    want = engine.generate(PROMPT, N_NEW, stop=[stop], ignore_eos=True)
    assert want.finish_reason == "stop"
    kw = {"model": "tiny", "prompt": PROMPT, "max_tokens": N_NEW, "temperature": 0,
          "stop": stop, "extra_body": {"ignore_eos": True}}
    r = client.completions.create(**kw)
    assert (r.choices[0].text, r.choices[0].finish_reason) == (want.text, "stop")
    assert r.choices[0].model_extra["token_ids"] == want.tokens
    streamed = list(client.completions.create(**kw, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == want.text
    assert stop not in want.text


def test_a_bad_chat_names_the_field(server) -> None:
    for messages, words in [([], "messages"), ([{"role": "robot", "content": "x"}], "role"),
                            ([{"role": "user", "content": "x", "name": "n"}], "messages.0.name")]:
        body = json.dumps({"model": "tiny", "messages": messages}).encode()
        got, _, reply = call(server, "POST", "/v1/chat/completions", body)
        err = json.loads(reply)["error"]
        assert got == 400 and err["param"].startswith("messages"), err
        assert words in err["message"], err


# -------------------------------------------------------------- streams and their slots

def open_stream(server: ServerProcess, max_tokens: int = LONG,
                until: bytes = b"data: ") -> socket.socket:
    """A raw streaming request, once `until` has arrived (default: its first event)."""
    u = urlsplit(server.http_url)
    s = socket.create_connection((u.hostname, u.port), timeout=60)
    body = completion(stream=True, max_tokens=max_tokens, stop_token_ids=[])  # no early EOS
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
              b"authorization: Bearer " + KEY.encode() + b"\r\ncontent-length: "
              + str(len(body)).encode() + b"\r\n\r\n" + body)
    got = b""
    while until not in got:
        chunk = s.recv(65536)
        assert chunk, got
        got += chunk
    assert got.startswith(b"HTTP/1.1 200"), got
    return s


def test_concurrent_streams_are_bounded_and_a_dropped_client_frees_its_slot(
        server, engine) -> None:
    before = scrape(server)
    # One runs; the rest wait in the engine's queue (their headers are out already).
    streams = [open_stream(server, until=b"data: " if i == 0 else b"\r\n\r\n")
               for i in range(MAX_STREAMS)]
    got, _, reply = call(server, "POST", "/v1/completions", completion())
    assert got == 429, reply
    assert json.loads(reply)["error"]["code"] == "too_many_requests"
    t0 = time.monotonic()
    for s in streams:
        s.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        got, _, reply = call(server, "POST", "/v1/completions", completion())
        if got != 429:
            break
        time.sleep(0.02)
    assert got == 200, reply
    freed_s = time.monotonic() - t0
    after = scrape(server)
    k = ("hybridgraph_requests_total", (("front", "http"), ("outcome", "cancelled")))
    assert after[k] - before[k] == MAX_STREAMS  # cancelled, not run to max_tokens
    assert freed_s < 10, freed_s


def test_a_client_gone_before_its_json_reply_cancels_too(server, engine) -> None:
    before = scrape(server)
    u = urlsplit(server.http_url)
    body = completion(max_tokens=LONG, stop_token_ids=[])
    with socket.create_connection((u.hostname, u.port), timeout=60) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: "
                  b"application/json\r\nauthorization: Bearer " + KEY.encode() +
                  b"\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        deadline = time.monotonic() + 30  # until the server has it in flight
        while scrape(server)[("hybridgraph_in_flight", ())] < 1:
            assert time.monotonic() < deadline
    k = ("hybridgraph_requests_total", (("front", "http"), ("outcome", "cancelled")))
    while scrape(server)[k] == before[k]:
        assert time.monotonic() < deadline, "the request ran on without its client"
        time.sleep(0.02)
    served(server, engine)


def test_sigterm_drains_http_streams_and_health_says_so(engine) -> None:
    with ServerProcess(None, "tiny", ["--device", "cpu", "--drain-s", "20"],
                       http="127.0.0.1:0") as srv:
        s = open_stream(srv, max_tokens=600)
        assert srv.proc is not None
        srv.proc.send_signal(15)
        deadline = time.monotonic() + 10
        while call(srv, "GET", "/health", key=None)[0] != 503:
            assert time.monotonic() < deadline
        status, _, body = call(srv, "GET", "/health", key=None)
        assert (status, json.loads(body)["status"]) == (503, "draining")
        got, _, reply = call(srv, "POST", "/v1/completions", completion())
        assert got == 503 and json.loads(reply)["error"]["code"] == "shutting_down", reply
        rest = b""
        while not rest.endswith(b"\r\n0\r\n\r\n"):  # the chunked body's end
            chunk = s.recv(65536)
            assert chunk, rest[-300:]
            rest += chunk
        s.close()
        assert b"data: [DONE]\n\n" in rest
        assert b'"finish_reason":"length"' in rest  # drained to the end, not cancelled
        assert srv.proc.wait(30) == 0


def test_the_bench_measures_both_fronts(server) -> None:
    import math

    from hybridgraph.bench.ipc import measure_http, measure_ipc

    r = {**measure_ipc(server.socket_path, n=5, warmup=1),
         **measure_http(server.http_url, n=5, warmup=1, api_key=KEY)}
    for what in ("ipc", "socket_added", "http_client", "http_server", "http_ipc", "http_added"):
        for stat in ("median", "p99"):
            assert math.isfinite(r[f"{what}_{stat}_ms"]), (what, r)
    assert r["http_added_median_ms"] > 0 and r["socket_added_median_ms"] > 0
    assert r["http_client_median_ms"] > r["http_server_median_ms"]
