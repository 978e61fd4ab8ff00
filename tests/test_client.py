"""Client library, CLI and IPC benchmark against a real `hybridgraph serve` process.

Client-side expectations come from the server itself (non-streamed, greedy), so this module
never loads the engine; tests/test_server.py checks the server against a direct engine.
The last test shuts the server down through the protocol.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator

import pytest

import hybridgraph
from hybridgraph.server.client import AsyncClient, Client, ServerError
from hybridgraph.server.launch import ServerProcess

PROMPT = [1, 40, 50, 60]


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    d = tempfile.mkdtemp(prefix="hg", dir="/tmp")
    try:
        with ServerProcess(os.path.join(d, "c.sock"), "tiny", ["--device", "cpu"]) as srv:
            yield srv
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def reference(server: ServerProcess) -> list[int]:
    with Client(server.socket_path) as c:
        return c.generate(prompt_ids=PROMPT, max_new_tokens=24, stop_ids=[])["tokens"]


def test_package_exports_clients() -> None:
    assert hybridgraph.Client is Client and hybridgraph.AsyncClient is AsyncClient


def test_generate_reply_fields(server: ServerProcess, reference: list[int]) -> None:
    with Client(server.socket_path) as c:
        r = c.generate(prompt_ids=PROMPT, max_new_tokens=24, stop_ids=[])
        assert r["tokens"] == reference and len(reference) == 24
        assert r["finish_reason"] == "length" and r["prompt_len"] == len(PROMPT)
        assert isinstance(r["text"], str)
        assert 0 < r["ttft_ms"] <= r["latency_ms"]
        t = c.generate(text="Hi", max_new_tokens=4)
        assert t["prompt_len"] == 3 and len(t["tokens"]) <= 4 and "text" in t


def test_stream_iterator_and_callback(server: ServerProcess, reference: list[int]) -> None:
    with Client(server.socket_path) as c:
        assert list(c.stream(prompt_ids=PROMPT, max_new_tokens=24, stop_ids=[])) == reference
        assert c.last_reply is not None and c.last_reply["tokens"] == reference
        seen: list[int] = []
        r = c.generate(prompt_ids=PROMPT, max_new_tokens=24, stop_ids=[], stream=True,
                       on_token=seen.append)
        assert seen == reference == r["tokens"]


def test_sampling_is_seeded(server: ServerProcess) -> None:
    with Client(server.socket_path) as c:
        kw = dict(prompt_ids=PROMPT, max_new_tokens=16, temperature=1.0, top_k=50, top_p=0.9,
                  stop_ids=[])
        a = c.generate(seed=123, **kw)["tokens"]
        assert c.generate(seed=123, **kw)["tokens"] == a


def test_leaving_a_stream_early_cancels_it(server: ServerProcess, reference: list[int]) -> None:
    with Client(server.socket_path) as c:
        for i, _ in enumerate(c.stream(prompt_ids=PROMPT, max_new_tokens=2000, stop_ids=[])):
            if i == 2:
                break
        # Its leftover frames are dropped; the connection serves the next request.
        assert c.generate(prompt_ids=PROMPT, max_new_tokens=24, stop_ids=[])["tokens"] == reference
        assert c.status()["in_flight"] == 0


def test_cancel_from_another_client(server: ServerProcess) -> None:
    got: dict[str, object] = {}

    def long_stream() -> None:
        with Client(server.socket_path) as c:
            got["reply"] = c.generate(prompt_ids=PROMPT, max_new_tokens=2000, stop_ids=[],
                                      stream=True, request_id="victim",
                                      on_token=lambda t: got.setdefault("first", t))

    t = threading.Thread(target=long_stream)
    t.start()
    with Client(server.socket_path) as c:
        deadline = time.monotonic() + 20
        while "first" not in got and time.monotonic() < deadline:
            time.sleep(0.005)
        assert c.cancel("victim") is True
        t.join(30)
        assert c.cancel("victim") is False  # finished: nothing left to cancel
        assert c.cancel("never-sent") is False
    reply = got["reply"]
    assert isinstance(reply, dict) and reply["finish_reason"] == "cancelled"
    assert len(reply["tokens"]) < 2000


def test_errors_raise_server_error(server: ServerProcess) -> None:
    with Client(server.socket_path) as c:
        with pytest.raises(ServerError) as e:
            c.generate(prompt_ids=PROMPT, max_new_tokens=-1)
        assert e.value.code == "bad_value" and e.value.field == "max_new_tokens"
        with pytest.raises(ServerError) as e:
            c.generate(prompt_ids=PROMPT, top_p=2.0)
        assert e.value.field == "top_p"
        with pytest.raises(ServerError) as e:
            c.generate()
        assert e.value.code == "missing_field"
        assert c.status()["model"] == "tiny"  # the connection is still good


def test_status_and_capture(server: ServerProcess) -> None:
    with Client(server.socket_path) as c:
        st = c.status()
        for key in ("model", "mode", "queue_depth", "requests_served", "uptime_s", "in_flight"):
            assert key in st
        assert st["mode"] == "eager" and st["uptime_s"] > 0
        assert c.capture([4, 8]) == 0  # CPU: no graphs, but the request goes through


def test_async_client_concurrent_requests(server: ServerProcess, reference: list[int]) -> None:
    async def main() -> None:
        async with AsyncClient(server.socket_path) as c:
            replies = await asyncio.gather(*[
                c.generate(prompt_ids=PROMPT, max_new_tokens=24, stop_ids=[], stream=s)
                for s in (False, True, False, True)], c.status())
            for r in replies[:4]:
                assert r["tokens"] == reference
            assert replies[4]["model"] == "tiny"
            tokens = [t async for t in c.stream(prompt_ids=PROMPT, max_new_tokens=24,
                                                stop_ids=[])]
            assert tokens == reference
            with pytest.raises(ServerError) as e:
                await c.generate(prompt_ids=[1, 10**6])
            assert e.value.field == "prompt_ids"
            assert await c.cancel("nothing") is False
            assert await c.capture([16]) == 0

    asyncio.run(main())


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hybridgraph.cli", *args], capture_output=True,
                          text=True, timeout=60)


def test_cli_generate_and_status_through_server(server: ServerProcess,
                                                reference: list[int]) -> None:
    r = _cli("generate", "--server", server.socket_path, "--prompt-ids",
             ",".join(map(str, PROMPT)), "--max-new-tokens", "24")
    assert r.returncode == 0, r.stderr
    first = reference[:next((i + 1 for i, t in enumerate(reference) if t == 2), 24)]
    assert f"tokens: {first}" in r.stdout and "TTFT" in r.stdout
    r = _cli("generate", "--server", server.socket_path, "--prompt-ids", "1,999")
    assert r.returncode == 2 and "prompt_ids" in r.stderr
    r = _cli("status", "--server", server.socket_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["model"] == "tiny"
    r = _cli("status", "--server", server.socket_path + ".missing")
    assert r.returncode == 1 and "cannot reach" in r.stderr


def test_measure_ipc(server: ServerProcess) -> None:
    from hybridgraph.bench.ipc import measure_ipc

    m = measure_ipc(server.socket_path, n=30, warmup=3)
    assert m["n"] == 30
    assert 0 < m["server_median_ms"] <= m["client_median_ms"]
    assert m["client_p99_ms"] >= m["client_median_ms"]
    assert m["ipc_median_ms"] > 0 and m["ipc_p99_ms"] >= m["ipc_median_ms"]


def test_a_timed_out_client_closes_rather_than_misreading_later(server: ServerProcess) -> None:
    c = Client(server.socket_path, timeout=0.05)
    with pytest.raises(TimeoutError):  # a 1,500-token generation outlasts 50 ms
        c.generate(prompt_ids=[1, 9], max_new_tokens=1500, stop_ids=[])
    with pytest.raises(OSError):  # closed: the late reply can't be mistaken for another's
        c.status()



def test_shutdown_request_stops_server(server: ServerProcess) -> None:
    with Client(server.socket_path) as c:
        c.shutdown()
    assert server.proc is not None and server.proc.wait(30) == 0, server.log()
    assert not os.path.exists(server.socket_path)
