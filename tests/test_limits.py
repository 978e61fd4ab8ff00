"""The server against a hostile local client: each bound in hybridgraph/server/limits.py.

An in-process server (its loop and worker on threads of this process) over the tiny model
on the CPU, with real Unix sockets; each test starts one with the limits it probes, which
costs milliseconds. The fairness test needs a second client *process* and starts one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from hybridgraph.server.client import Client
from hybridgraph.server.limits import Limits
from hybridgraph.server.protocol import encode_frame, recv_frame


@pytest.fixture(scope="module")
def engine():
    from hybridgraph.engine import Engine

    return Engine.load("tiny", device="cpu")


@pytest.fixture
def sockdir() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="hg", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def serve(engine, sockdir: str) -> Callable[..., Any]:
    """serve(**limits) -> a started in-process Server; stopped after the test."""
    from hybridgraph.server.server import Server

    started: list[tuple[Server, threading.Thread]] = []

    def start(**limits: Any) -> Server:
        import asyncio

        srv = Server(engine, os.path.join(sockdir, f"{len(started)}.sock"), Limits(**limits))
        t = threading.Thread(target=lambda: asyncio.run(srv.run()), daemon=True)
        t.start()
        assert srv.ready.wait(30), "server not ready"
        started.append((srv, t))
        return srv

    yield start
    for srv, t in started:
        assert srv.loop is not None
        srv.loop.call_soon_threadsafe(srv.begin_shutdown, "test over")
        t.join(40)
        assert not t.is_alive()


@contextmanager
def raw(path: str, timeout: float = 30) -> Iterator[socket.socket]:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(timeout)
    s.connect(path)
    try:
        yield s
    finally:
        s.close()


def gen(rid: Any, **fields: Any) -> bytes:
    return encode_frame({"type": "generate", "request_id": rid, "prompt_ids": [1, 5, 9],
                         "stop_ids": [], **fields})


def closed(s: socket.socket) -> bool:
    """EOF (or a reset) next, with nothing else before it."""
    try:
        return recv_frame(s, 1 << 20) is None
    except ConnectionResetError:
        return True


# ---------------------------------------------------------------- 1. refused frames

def test_error_replies_wait_for_the_client_to_read(serve: Callable[..., Any]) -> None:
    # Each refused frame earns a reply several times its size. Unthrottled, replies pile up
    # in the server until the unread-bytes bound drops the client; throttled, the server
    # stops reading this client, whose sends block, and nothing is lost.
    srv = serve(max_unread_bytes=256 << 10)
    bad = gen(1, prompt_ids=[1, 300])  # out of vocabulary: bad_value, not a protocol strike
    with raw(srv.path) as s:
        s.settimeout(0.5)
        sent = 0
        try:
            for _ in range(200_000):
                s.sendall(bad)
                sent += 1
        except TimeoutError:
            pass  # the server stopped reading us: the point
        assert 1000 < sent < 200_000, sent
        s.settimeout(30)
        for i in range(sent):  # every one answered once we read, then the connection goes on
            r = recv_frame(s, 1 << 20)
            assert r is not None and r["code"] == "bad_value", (i, r)
        s.sendall(encode_frame({"type": "status", "request_id": "after"}))
        r = recv_frame(s, 1 << 20)
        assert r is not None and r["type"] == "status"


def test_a_connection_that_keeps_sending_invalid_frames_is_closed(
        serve: Callable[..., Any], caplog: pytest.LogCaptureFixture) -> None:
    srv = serve(max_refused_frames=16)
    junk = struct.pack(">I", 3) + b"\xc1\xc1\xc1"
    for _ in range(3):
        with raw(srv.path) as s:
            s.sendall(junk * 100)
            codes = []
            while (r := recv_frame(s, 1 << 20)) is not None:
                codes.append(r["code"])
            assert codes == ["malformed"] * 16 + ["too_many_errors"], codes
    with Client(srv.path, timeout=30) as c:  # others are served
        assert c.status()["events"]["too_many_errors"] == 3
    lines = [r for r in caplog.records if "refused frames" in r.getMessage()]
    assert len(lines) == 1, [r.getMessage() for r in lines]  # logged once, counted after


# --------------------------------------------- 2. connections, deadlines, idle, logs

def test_connections_are_capped_and_logged_once(serve: Callable[..., Any],
                                                caplog: pytest.LogCaptureFixture) -> None:
    srv = serve(max_connections=4)
    held = [socket.socket(socket.AF_UNIX) for _ in range(4)]
    try:
        for h in held:  # accepted in this order, before the ones below
            h.connect(srv.path)
        for _ in range(20):
            with raw(srv.path) as s:
                r = recv_frame(s, 1 << 20)
                assert r is not None and r["code"] == "too_many_connections", r
                assert closed(s)
    finally:
        held.pop().close()
    deadline = time.monotonic() + 10
    while True:  # one slot is free again once the server has seen the close
        with raw(srv.path) as s:
            s.sendall(encode_frame({"type": "status", "request_id": 1}))
            r = recv_frame(s, 1 << 20)
            if r is not None and r["type"] == "status":
                assert r["status"]["events"]["connections_refused"] >= 20
                break
        assert time.monotonic() < deadline, r
        time.sleep(0.05)
    for h in held:
        h.close()
    lines = [r for r in caplog.records if "refusing connections" in r.getMessage()]
    assert len(lines) == 1, [r.getMessage() for r in lines]


@pytest.mark.parametrize("partial", [b"\x00\x00", struct.pack(">I", 50) + b"\x81"],
                         ids=["header", "body"])
def test_a_partial_frame_times_out(serve: Callable[..., Any], partial: bytes) -> None:
    srv = serve(frame_timeout_s=0.3, idle_timeout_s=60)
    with raw(srv.path, timeout=10) as s:
        s.sendall(partial)
        t0 = time.monotonic()
        r = recv_frame(s, 1 << 20)
        assert r is not None and r["code"] == "timeout", r
        assert 0.25 < time.monotonic() - t0 < 5
        assert closed(s)


def test_idle_connections_close_but_not_while_their_work_runs(
        serve: Callable[..., Any]) -> None:
    srv = serve(idle_timeout_s=0.4)
    with raw(srv.path, timeout=10) as s:
        t0 = time.monotonic()
        r = recv_frame(s, 1 << 20)
        assert r is not None and r["code"] == "idle" and r["request_id"] is None, r
        assert 0.3 < time.monotonic() - t0 < 5
        assert closed(s)
    with raw(srv.path, timeout=30) as s:
        s.sendall(gen("long", max_new_tokens=1500))  # outlasts 0.4 s: still not idle
        r = recv_frame(s, 1 << 20)
        assert r is not None and r["type"] == "result" and len(r["tokens"]) == 1500, r
        assert r["latency_ms"] > 400


# ---------------------------------------------------------------- 3. cancel, status

def test_cancel_and_status_reach_only_the_callers_own_requests(
        serve: Callable[..., Any]) -> None:
    srv = serve()
    with raw(srv.path) as victim:
        victim.sendall(gen("victim", max_new_tokens=2000, stream=True))
        first = recv_frame(victim, 1 << 20)
        assert first is not None and first["type"] == "token"
        with Client(srv.path, timeout=30) as other:
            assert other.cancel("victim") is False
            st = other.status()
            assert st["busy"] is True and st["running"] is None
            assert "victim" not in json.dumps(st)
        victim.sendall(encode_frame({"type": "status", "request_id": "st"}) +
                       encode_frame({"type": "cancel", "request_id": "c", "target": "victim"}))
        seen: dict[str, Any] = {}
        while "victim" not in seen:
            r = recv_frame(victim, 1 << 20)
            assert r is not None
            if r["type"] != "token":
                seen[r["request_id"]] = r
        assert seen["st"]["status"]["running"] == "victim"
        assert seen["c"]["cancelled"] is True
        assert seen["victim"]["finish_reason"] == "cancelled"


# ---------------------------------------------------------------------- 4. fairness

HOG = """
import socket, sys, time
from hybridgraph.server.protocol import encode_frame
socks = []
for c in range(4):
    s = socket.socket(socket.AF_UNIX)
    s.connect(sys.argv[1])
    s.sendall(b"".join(encode_frame({"type": "generate", "request_id": i, "prompt_ids": [1, 7],
                                     "max_new_tokens": 200, "stop_ids": []})
                       for i in range(16)))
    socks.append(s)
print("sent", flush=True)
time.sleep(120)
"""


def test_one_process_cannot_fill_the_queue_ahead_of_another(
        serve: Callable[..., Any]) -> None:
    srv = serve(max_jobs_per_peer=64)
    hog = subprocess.Popen([sys.executable, "-c", HOG, srv.path], stdout=subprocess.PIPE,
                           text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        assert hog.stdout is not None and hog.stdout.readline().strip() == "sent"
        with Client(srv.path, timeout=60) as c:
            deadline = time.monotonic() + 20
            while c.status()["in_flight"] < 64:  # 64 jobs of ~0.25 s: ~15 s one by one
                assert time.monotonic() < deadline
                time.sleep(0.01)
            # The hog's 64-job quota is full: one more from it would be refused.
            t0 = time.monotonic()
            r = c.generate(prompt_ids=[1, 9], max_new_tokens=4, stop_ids=[])
            waited = time.monotonic() - t0
            left = c.status()["in_flight"]
        # Round-robin: this process's job ran next, not behind the hog's 60-odd.
        assert left >= 48, (left, r["queue_ms"])
        assert waited < 5, (waited, r["queue_ms"])
    finally:
        hog.kill()
        hog.wait()
    with Client(srv.path, timeout=30) as c:  # the hog's sockets closed: its work cancelled
        deadline = time.monotonic() + 20
        while c.status()["in_flight"]:
            assert time.monotonic() < deadline
            time.sleep(0.02)


def test_one_process_is_bounded_across_its_connections(serve: Callable[..., Any]) -> None:
    srv = serve(max_jobs_per_peer=3)
    with raw(srv.path) as a, raw(srv.path) as b:
        a.sendall(b"".join(gen(i, max_new_tokens=1000) for i in range(2)))
        with Client(srv.path, timeout=30) as c:  # the two are admitted
            while c.status()["in_flight"] < 2:
                time.sleep(0.01)
        b.sendall(gen("third", max_new_tokens=1000) + gen("fourth", max_new_tokens=1000))
        r = recv_frame(b, 1 << 20)
        assert r is not None and r["code"] == "busy" and r["request_id"] == "fourth", r
        assert "from this process" in r["message"]


# ------------------------------------------------------------ 5. duplicate request_id

def test_a_duplicate_request_id_gets_an_unambiguous_refusal(
        serve: Callable[..., Any]) -> None:
    srv = serve()
    with raw(srv.path) as s:
        s.sendall(gen(5, max_new_tokens=64) + gen(5, max_new_tokens=4))
        replies = [recv_frame(s, 1 << 20), recv_frame(s, 1 << 20)]
        assert replies[0] is not None and replies[0]["type"] == "error"
        assert replies[0]["code"] == "duplicate_request_id"
        assert replies[0]["request_id"] is None and "5" in replies[0]["message"]
        assert replies[1] is not None and replies[1]["type"] == "result"
        assert replies[1]["request_id"] == 5 and len(replies[1]["tokens"]) == 64


# ---------------------------------------------------------------------- 6. half-close

@pytest.mark.parametrize("stream", [False, True])
def test_half_close_finishes_the_connections_jobs(serve: Callable[..., Any],
                                                  stream: bool) -> None:
    srv = serve()
    with raw(srv.path) as s:
        s.sendall(gen("a", max_new_tokens=40, stream=stream) + gen("b", max_new_tokens=8))
        s.shutdown(socket.SHUT_WR)  # as `nc -N` does: done sending, still reading
        results = {}
        while (r := recv_frame(s, 1 << 20)) is not None:
            if r["type"] != "token":
                results[r["request_id"]] = r
    assert results["a"]["finish_reason"] == "length" and len(results["a"]["tokens"]) == 40
    assert results["b"]["finish_reason"] == "length" and len(results["b"]["tokens"]) == 8


def test_a_full_close_still_cancels_unstreamed_work(serve: Callable[..., Any]) -> None:
    srv = serve()
    with raw(srv.path) as s:
        s.sendall(gen("long", max_new_tokens=2000))
        with Client(srv.path, timeout=30) as c:
            while c.status()["in_flight"] < 1:
                time.sleep(0.01)
    with Client(srv.path, timeout=30) as c:
        deadline = time.monotonic() + 10  # 2,000 tokens would take seconds longer
        while (st := c.status())["in_flight"]:
            assert time.monotonic() < deadline, st
            time.sleep(0.02)
        assert st["requests_cancelled"] == 1


# ------------------------------------------------------------- 7. text off the loop

def test_a_huge_text_is_refused_before_it_is_tokenized(serve: Callable[..., Any],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    srv = serve(max_frame_bytes=4 << 20)
    calls: list[int] = []
    encode = srv.engine.tokenizer.encode
    monkeypatch.setattr(srv.engine.tokenizer, "encode",
                        lambda text: calls.append(len(text)) or encode(text))
    with raw(srv.path) as s:
        s.sendall(encode_frame({"type": "generate", "request_id": 1, "text": "x" * (1 << 20)}))
        r = recv_frame(s, 1 << 20)
    assert r is not None and r["code"] == "bad_value" and r["field"] == "text", r
    assert "1048576 characters" in r["message"]
    assert calls == []


def test_text_is_tokenized_off_the_event_loop(serve: Callable[..., Any],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    srv = serve()
    encode = srv.engine.tokenizer.encode
    started = threading.Event()

    def slow(text: str) -> list[int]:  # a slow tokenizer: the loop must not wait on it
        started.set()
        time.sleep(1.0)
        return encode(text)

    monkeypatch.setattr(srv.engine.tokenizer, "encode", slow)
    with raw(srv.path) as s, Client(srv.path, timeout=30) as c:
        s.sendall(encode_frame({"type": "generate", "request_id": 1, "text": "Hello",
                                "max_new_tokens": 2}))
        assert started.wait(10)
        t0 = time.monotonic()
        c.status()
        assert time.monotonic() - t0 < 0.5
        r = recv_frame(s, 1 << 20)
        assert r is not None and r["type"] == "result" and r["prompt_len"] == 6, r


# ------------------------------------------------------------------ 11. admin requests

def test_admin_requests_need_the_flag(serve: Callable[..., Any]) -> None:
    srv = serve()
    with raw(srv.path) as s:
        for kind, extra in (("shutdown", {}), ("capture", {"lengths": [4]})):
            s.sendall(encode_frame({"type": kind, "request_id": kind, **extra}))
            r = recv_frame(s, 1 << 20)
            assert r is not None and r["code"] == "forbidden" and r["request_id"] == kind, r
    assert not srv.stopping
    admin = serve(allow_admin=True)
    with Client(admin.path, timeout=30) as c:
        assert c.capture([4]) == 0  # CPU: no graphs, but the request goes through


def test_limits_refuse_nonsense() -> None:
    for bad in (dict(max_frame_bytes=0), dict(max_frame_bytes=2**32), dict(frame_timeout_s=0),
                dict(max_connections=-1), dict(max_jobs_per_peer=0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            Limits(**bad)
    assert Limits().max_connections > 0


def test_repeated_events_are_logged_once_with_a_count() -> None:
    from hybridgraph.server.limits import EventLog

    events = EventLog(every_s=60)
    records: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage() + ("+tb" if record.exc_info else ""))

    h = Catch()
    logging.getLogger("hybridgraph.server").addHandler(h)
    try:
        err = OSError(24, "Too many open files")
        for _ in range(1000):
            events.event("accept", "socket.accept() out of system resource", exc=err)
    finally:
        logging.getLogger("hybridgraph.server").removeHandler(h)
    assert records == ["socket.accept() out of system resource; 1 in all+tb"]
    assert events.totals["accept"] == 1000
