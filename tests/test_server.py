"""The graph server as a real process: `hybridgraph serve --model tiny --device cpu`.

One server is shared by the module; the lifecycle tests (stale socket, SIGTERM) start
their own. Socket paths are short, under /tmp: AF_UNIX allows 107 bytes.
"""

from __future__ import annotations

import os
import pickle
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest

from hybridgraph.server.client import Client, ServerError
from hybridgraph.server.launch import ServerProcess
from hybridgraph.server.protocol import encode_frame, recv_frame

MAX_FRAME = 4096
PROMPTS = [[1] + [3 + (7 * i + 5 * j) % 250 for j in range(3 + i)] for i in range(8)]
N_NEW = 48


@pytest.fixture(scope="module")
def server(sockdir: str) -> Iterator[ServerProcess]:
    with ServerProcess(os.path.join(sockdir, "s.sock"), "tiny",
                       ["--device", "cpu", "--max-frame-bytes", str(MAX_FRAME),
                        "--allow-admin"]) as srv:
        yield srv


@pytest.fixture(scope="module")
def expected() -> dict[int, list[int]]:
    """What a direct engine call gives, greedy, for each of PROMPTS (same seed 0 weights)."""
    from hybridgraph.engine import Engine

    engine = Engine.load("tiny", device="cpu")
    return {i: engine.generate(p, N_NEW, stop_ids=[]).tokens for i, p in enumerate(PROMPTS)}


def healthy(path: str, expected: dict[int, list[int]]) -> None:
    with Client(path, timeout=30) as c:
        assert c.generate(prompt_ids=PROMPTS[0], max_new_tokens=N_NEW,
                          stop_ids=[])["tokens"] == expected[0]


def test_socket_file_is_0600(server: ServerProcess) -> None:
    st = os.stat(server.socket_path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600


def test_concurrent_clients_get_engine_tokens_streamed_in_order(
        server: ServerProcess, expected: dict[int, list[int]]) -> None:
    streamed: dict[int, list[int]] = {}
    replies: dict[int, dict[str, Any]] = {}
    errors: list[BaseException] = []
    go = threading.Barrier(len(PROMPTS) + 1)

    def run(i: int) -> None:
        try:
            with Client(server.socket_path, timeout=60) as c:
                go.wait()
                streamed[i] = []
                replies[i] = c.generate(prompt_ids=PROMPTS[i], max_new_tokens=N_NEW,
                                        stop_ids=[], stream=True, on_token=streamed[i].append)
        except BaseException as e:  # surfaced below, in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    seen_busy, status_ms = 0, []
    with Client(server.socket_path, timeout=30) as c:
        go.wait()
        while any(t.is_alive() for t in threads):
            t0 = time.perf_counter()
            st = c.status()
            status_ms.append((time.perf_counter() - t0) * 1e3)
            seen_busy = max(seen_busy, st["in_flight"])
    for t in threads:
        t.join()
    assert not errors, errors
    for i in range(len(PROMPTS)):
        assert streamed[i] == expected[i], f"client {i} streamed other tokens"
        assert replies[i]["tokens"] == expected[i]
        assert replies[i]["finish_reason"] == "length"
        assert replies[i]["latency_ms"] >= replies[i]["ttft_ms"] > 0
    assert seen_busy >= 1, "status never ran while generations were in flight"
    # Not queued behind them (each takes ~1 s): a loose bound, CI's 2 cores are busy.
    assert sorted(status_ms)[len(status_ms) // 2] < 500, status_ms


def test_stream_frames_carry_indexes_in_order(server: ServerProcess,
                                             expected: dict[int, list[int]]) -> None:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(30)
        s.connect(server.socket_path)
        s.sendall(encode_frame({"type": "generate", "request_id": "r", "prompt_ids": PROMPTS[3],
                                "max_new_tokens": N_NEW, "stop_ids": [], "stream": True}))
        frames = [recv_frame(s, 1 << 20) for _ in range(N_NEW + 1)]
    assert all(f is not None for f in frames)
    tokens = [f for f in frames if f and f["type"] == "token"]
    assert [f["index"] for f in tokens] == list(range(N_NEW))
    assert [f["token"] for f in tokens] == expected[3]
    assert frames[-1] and frames[-1]["type"] == "result" and frames[-1]["request_id"] == "r"


def _gen(**fields: Any) -> bytes:
    return msgpack.packb({"type": "generate", "request_id": 9, "prompt_ids": [1, 2, 3],
                          **fields})


def _frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


# (name, bytes sent, then half-close?, error code, words the message must name, fatal?)
BAD_FRAMES = [
    ("over-max", struct.pack(">I", MAX_FRAME + 1), False, "frame_too_large",
     str(MAX_FRAME + 1), True),
    ("truncated", struct.pack(">I", 100) + b"\x81" * 10, True, "truncated", "10 of 100", True),
    ("not-msgpack", _frame(b"\xc1\xc1 not msgpack"), False, "malformed", "MessagePack", False),
    ("pickle", _frame(pickle.dumps({"type": "status", "request_id": 1})), False, "malformed",
     "MessagePack", False),
    ("not-a-map", _frame(msgpack.packb([1, 2, 3])), False, "malformed", "map", False),
    ("wrong-type", _frame(_gen(prompt_ids="hello")), False, "bad_type", "prompt_ids", False),
    ("wrong-type-int", _frame(_gen(max_new_tokens="8")), False, "bad_type", "max_new_tokens",
     False),
    ("unknown-type", _frame(msgpack.packb({"type": "explode", "request_id": 1})), False,
     "unknown_type", "explode", False),
    ("missing-id", _frame(msgpack.packb({"type": "status"})), False, "missing_field",
     "request_id", False),
    ("missing-prompt", _frame(msgpack.packb({"type": "generate", "request_id": 1})), False,
     "missing_field", "prompt_ids", False),
    ("negative-max-new", _frame(_gen(max_new_tokens=-5)), False, "bad_value", "max_new_tokens",
     False),
    ("huge-max-new", _frame(_gen(max_new_tokens=2**64 - 1)), False, "bad_value",
     "max_new_tokens", False),
    ("kv-overflow", _frame(_gen(max_new_tokens=2046)), False, "bad_value", "max_new_tokens",
     False),
    ("out-of-vocab", _frame(_gen(prompt_ids=[1, 259, 2])), False, "bad_value", "vocabulary",
     False),
    ("empty-prompt", _frame(_gen(prompt_ids=[])), False, "bad_value", "prompt_ids", False),
    ("empty-frame", _frame(b""), False, "malformed", "empty", False),
    ("capture-past-cache", _frame(msgpack.packb({"type": "capture", "request_id": 1,
                                                 "lengths": [16, 100000]})), False,
     "bad_value", "lengths", False),
    ("huge-top-k", _frame(_gen(top_k=2**40)), False, "bad_value", "top_k", False),
    ("infinite-temperature", _frame(_gen(temperature=float("inf"))), False, "bad_value",
     "temperature", False),
    ("capture-too-many", _frame(msgpack.packb({"type": "capture", "request_id": 1,
                                               "lengths": list(range(1, 66))})), False,
     "bad_value", "at most 64", False),
]


@pytest.mark.parametrize("name, data, half_close, code, names, fatal", BAD_FRAMES,
                         ids=[b[0] for b in BAD_FRAMES])
def test_bad_frame_gets_error_then_server_serves_on(
        server: ServerProcess, expected: dict[int, list[int]], name: str, data: bytes,
        half_close: bool, code: str, names: str, fatal: bool) -> None:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(30)
        s.connect(server.socket_path)
        s.sendall(data)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        reply = recv_frame(s, 1 << 20)
        assert reply is not None and reply["type"] == "error", reply
        assert reply["code"] == code, reply
        assert names in reply["message"], reply
        if fatal:
            assert recv_frame(s, 1 << 20) is None  # the stream can't be re-synced: closed
        else:  # the same connection goes on
            s.sendall(encode_frame({"type": "status", "request_id": "after"}))
            after = recv_frame(s, 1 << 20)
            assert after and after["type"] == "status" and after["request_id"] == "after"
    healthy(server.socket_path, expected)


def test_engine_error_names_field_through_client(server: ServerProcess) -> None:
    with Client(server.socket_path, timeout=30) as c:
        with pytest.raises(ServerError) as e:
            c.generate(prompt_ids=[1, 2, 300])
        assert e.value.code == "bad_value" and e.value.field == "prompt_ids"
        with pytest.raises(ServerError) as e:
            c.generate(text="x" * 3000)
        assert e.value.field == "text" and "max_seq_len" in e.value.message


def _wait_idle(path: str, cancelled_before: int, timeout_s: float = 20) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    with Client(path, timeout=30) as c:
        while True:
            st = c.status()
            if st["in_flight"] == 0 and st["requests_cancelled"] > cancelled_before:
                return st
            assert time.monotonic() < deadline, f"slot not freed: {st}"
            time.sleep(0.02)


def test_killed_client_frees_its_slot(server: ServerProcess,
                                      expected: dict[int, list[int]]) -> None:
    with Client(server.socket_path) as c:
        before = c.status()["requests_cancelled"]
    script = ("import sys, time\n"
              "from hybridgraph.server.client import Client\n"
              "c = Client(sys.argv[1])\n"
              "it = c.stream(prompt_ids=[1, 5, 6], max_new_tokens=2000, stop_ids=[])\n"
              "print(next(it), flush=True)\n"
              "time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", script, server.socket_path],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip().isdigit()
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        proc.kill()
    st = _wait_idle(server.socket_path, before)
    assert st["disconnects"] >= 1
    healthy(server.socket_path, expected)


def test_abrupt_close_mid_stream_frees_slot(server: ServerProcess,
                                            expected: dict[int, list[int]]) -> None:
    with Client(server.socket_path) as c:
        before = c.status()["requests_cancelled"]
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(30)
    s.connect(server.socket_path)
    s.sendall(encode_frame({"type": "generate", "request_id": 1, "prompt_ids": [1, 9],
                            "max_new_tokens": 2000, "stop_ids": [], "stream": True}))
    first = recv_frame(s, 1 << 20)
    assert first and first["type"] == "token"
    s.close()
    _wait_idle(server.socket_path, before)
    healthy(server.socket_path, expected)


def test_second_server_on_live_socket_is_refused(server: ServerProcess,
                                                 expected: dict[int, list[int]]) -> None:
    r = subprocess.run([sys.executable, "-m", "hybridgraph.cli", "serve", "--model", "tiny",
                        "--device", "cpu", "--socket", server.socket_path],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "already listening" in r.stderr, r.stderr
    assert os.path.exists(server.socket_path)
    healthy(server.socket_path, expected)


def test_unusable_socket_paths_are_refused(sockdir: str) -> None:
    from hybridgraph.server.sockets import ServeError, check_socket_path

    plain = os.path.join(sockdir, "plain")
    with open(plain, "w") as f:
        f.write("not a socket")
    with pytest.raises(ServeError, match="not a socket"):
        check_socket_path(plain)
    assert os.path.exists(plain)
    with pytest.raises(ServeError, match="107"):
        check_socket_path("/tmp/" + "x" * 120)


def test_stale_socket_restart_and_sigterm(sockdir: str, expected: dict[int, list[int]]) -> None:
    path = os.path.join(sockdir, "stale.sock")
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(path)  # a server that died without cleaning up: the file, nobody listening
    dead.close()
    assert os.path.exists(path)
    srv = ServerProcess(path, "tiny", ["--device", "cpu", "--drain-s", "0.3"]).start()
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        healthy(path, expected)
        # A long generation is in flight when SIGTERM comes: it drains, then is cancelled.
        c = Client(path, timeout=30)
        it = c.stream(prompt_ids=[1, 7], max_new_tokens=2000, stop_ids=[])
        next(it)
        srv.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        rest = list(it)
        reply = c.last_reply
        # 2,000 tokens outlast the 0.3 s drain on any CPU: the rest must be cancelled.
        assert reply is not None and reply["finish_reason"] == "cancelled"
        assert len(rest) + 1 == len(reply["tokens"])
        c.close()
        assert srv.proc.wait(30) == 0, srv.log()  # type: ignore[union-attr]
    finally:
        srv.kill()
    assert not os.path.exists(path)
    with pytest.raises(OSError):
        Client(path)
    assert "shutting down" in srv.log()


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_a_full_queue_answers_busy_and_frees_on_disconnect(
        server: ServerProcess, expected: dict[int, list[int]]) -> None:
    from hybridgraph.server.limits import Limits

    MAX_JOBS_PER_CONNECTION = Limits().max_jobs_per_connection
    n = MAX_JOBS_PER_CONNECTION + 6
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(60)
        s.connect(server.socket_path)
        # Long jobs, all sent at once: the first runs, the queue fills, the rest are refused.
        s.sendall(b"".join(encode_frame({"type": "generate", "request_id": i,
                                         "prompt_ids": [1, 5], "max_new_tokens": 2000,
                                         "stop_ids": []}) for i in range(n)))
        busy = 0
        while busy < n - MAX_JOBS_PER_CONNECTION:
            reply = recv_frame(s, 1 << 20)
            assert reply is not None and reply["type"] == "error", reply
            assert reply["code"] == "busy", reply
            busy += 1
    # Closing the connection cancels its queued work: the next client is served at once.
    healthy(server.socket_path, expected)


def test_a_client_that_never_reads_cannot_grow_the_server(
        server: ServerProcess, expected: dict[int, list[int]]) -> None:
    assert server.proc is not None
    before = _rss_kib(server.proc.pid)
    frame = encode_frame({"type": "status", "request_id": 1})
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(server.socket_path)
        s.settimeout(0.2)
        sent, t_end = 0, time.monotonic() + 4
        while time.monotonic() < t_end:  # send status requests, read no reply
            try:
                s.sendall(frame * 64)
                sent += 64
            except (TimeoutError, BlockingIOError):
                pass  # the server stopped reading us: that is the point
        with Client(server.socket_path, timeout=30) as c:  # others are still served
            assert c.status()["pid"] == server.proc.pid
        grown_mib = (_rss_kib(server.proc.pid) - before) / 1024
    # Unthrottled, the replies to these requests would pile up in the server's memory.
    assert grown_mib < 32, (grown_mib, sent)
    healthy(server.socket_path, expected)


def _serve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hybridgraph.cli", "serve", "--model", "tiny",
                           "--device", "cpu", *args], capture_output=True, text=True,
                          timeout=60)


def test_start_up_failures_say_error_not_traceback(sockdir: str) -> None:
    plain = os.path.join(sockdir, "a-file")
    with open(plain, "w") as f:
        f.write("x")
    for path in (os.path.join(plain, "s.sock"), os.path.join(sockdir, "no-dir", "s.sock")):
        r = _serve("--socket", path)
        assert r.returncode == 1, r.stderr
        assert r.stderr.startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    r = _serve("--socket", os.path.join(sockdir, "f.sock"), "--max-frame-bytes", "0")
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert "error: --max-frame-bytes must be in [64, 4294967295], got 0" in r.stderr, r.stderr
    assert not os.path.exists(os.path.join(sockdir, "f.sock"))


def test_an_unremovable_stale_socket_is_a_serve_error(sockdir: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from hybridgraph.server import sockets

    path = os.path.join(sockdir, "stuck.sock")
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(path)
    dead.close()

    def refuse(p: str) -> None:
        raise PermissionError(13, "Permission denied", p)

    monkeypatch.setattr(sockets.os, "unlink", refuse)  # as in a directory we can't write
    with pytest.raises(sockets.ServeError, match="cannot remove the stale socket"):
        sockets.check_socket_path(path)


def test_shutdown_request_stops_an_admin_server(server: ServerProcess) -> None:
    # Last in this module: the shared server is gone afterwards.
    with Client(server.socket_path) as c:
        c.shutdown()
    assert server.proc is not None and server.proc.wait(30) == 0, server.log()
    assert not os.path.exists(server.socket_path)


def test_at_the_fd_limit_refusals_are_counted_not_traceback_floods(
        sockdir: str, expected: dict[int, list[int]]) -> None:
    # A cap set above the fd limit (96): accept() itself fails, and asyncio reports every
    # retry (one a second) with a traceback, unless the server collapses them.
    path = os.path.join(sockdir, "fd.sock")
    srv = ServerProcess(path, "tiny", ["--device", "cpu", "--max-connections", "200"])
    srv.cmd = ["sh", "-c", 'ulimit -n 96 && exec "$@"', "sh", *srv.cmd]
    socks: list[socket.socket] = []
    with srv:
        try:
            for _ in range(110):  # past the fd limit; the rest wait in the listen backlog
                s = socket.socket(socket.AF_UNIX)
                s.connect(path)
                socks.append(s)
            time.sleep(3.5)  # several of asyncio's accept retries
        finally:
            for s in socks:
                s.close()
        deadline = time.monotonic() + 30
        while True:  # served again once the server has seen the closes
            try:
                healthy(path, expected)
                break
            except (ServerError, OSError):
                assert time.monotonic() < deadline
                time.sleep(0.1)
    out = srv.log()
    assert out.count("out of system resource") == 1, out
    assert out.count("Traceback") <= 1, out


def test_the_default_connection_cap_stays_under_the_fd_limit(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from hybridgraph.server import limits

    monkeypatch.setattr(limits.resource, "getrlimit", lambda _: (256, 4096))
    assert limits.Limits().max_connections == 192
    monkeypatch.setattr(limits.resource, "getrlimit", lambda _: (1 << 20, 1 << 20))
    assert limits.Limits().max_connections == 1024
