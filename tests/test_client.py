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
from collections.abc import Iterator

import pytest

import hybridgraph
from hybridgraph.request import RequestError, SamplingParams
from hybridgraph.server.client import DEFAULT_TIMEOUT_S, AsyncClient, Client, ServerError
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


def test_cancel_reaches_only_the_callers_own_requests(server: ServerProcess) -> None:
    got: dict[str, object] = {}
    mine = Client(server.socket_path)

    def on_token(t: int) -> None:
        if "first" not in got:
            got["first"] = t
            # Another client can neither cancel this request nor learn its id.
            with Client(server.socket_path) as other:
                got["other_cancel"] = other.cancel("victim")
                got["other_status"] = json.dumps(other.status())
            got["own_cancel"] = mine.cancel("victim")

    reply = mine.generate(prompt_ids=PROMPT, max_new_tokens=2000, stop_ids=[], stream=True,
                          request_id="victim", on_token=on_token)
    mine.close()
    assert got["other_cancel"] is False
    assert "victim" not in str(got["other_status"])
    assert got["own_cancel"] is True
    assert reply["finish_reason"] == "cancelled" and len(reply["tokens"]) < 2000
    with Client(server.socket_path) as c:
        assert c.cancel("victim") is False  # finished: nothing left to cancel
        assert c.cancel("never-sent") is False


def test_errors_raise_server_error(server: ServerProcess) -> None:
    with Client(server.socket_path) as c:
        with pytest.raises(ServerError) as e:
            c.generate(prompt_ids=PROMPT, max_new_tokens=-1)
        assert e.value.code == "bad_value" and e.value.field == "max_new_tokens"
        with pytest.raises(RequestError) as local:  # refused before it is sent
            c.generate(prompt_ids=PROMPT, top_p=2.0)
        assert local.value.field == "top_p"
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
        assert st["allow_admin"] is False


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



def test_admin_requests_are_refused_without_allow_admin(server: ServerProcess,
                                                        reference: list[int]) -> None:
    with Client(server.socket_path) as c:
        for call in (c.shutdown, lambda: c.capture([4, 8])):
            with pytest.raises(ServerError) as e:
                call()
            assert e.value.code == "forbidden" and "--allow-admin" in e.value.message
        assert c.generate(prompt_ids=PROMPT, max_new_tokens=24, stop_ids=[])["tokens"] == reference
    assert server.proc is not None and server.proc.poll() is None


def test_clients_take_sampling_params(server: ServerProcess) -> None:
    sp = SamplingParams(temperature=1.0, top_k=50, top_p=0.9, seed=7)
    with Client(server.socket_path) as c:
        a = c.generate(prompt_ids=PROMPT, max_new_tokens=12, sampling=sp, stop_ids=[])
        b = c.generate(prompt_ids=PROMPT, max_new_tokens=12, temperature=1.0, top_k=50,
                       top_p=0.9, seed=7, stop_ids=[])
        assert a["tokens"] == b["tokens"]
        assert list(c.stream(prompt_ids=PROMPT, max_new_tokens=12, sampling=sp,
                             stop_ids=[])) == a["tokens"]
        with pytest.raises(TypeError, match="not both"):
            c.generate(prompt_ids=PROMPT, sampling=sp, temperature=0.5)
        with pytest.raises(RequestError) as e:
            c.generate(prompt_ids=PROMPT, sampling={"temperature": 1.0})  # type: ignore[arg-type]
        assert e.value.field == "sampling"

    async def main() -> list[int]:
        async with AsyncClient(server.socket_path) as ac:
            return (await ac.generate(prompt_ids=PROMPT, max_new_tokens=12, sampling=sp,
                                      stop_ids=[]))["tokens"]

    assert asyncio.run(main()) == a["tokens"]


def test_clients_refuse_a_request_id_in_flight(server: ServerProcess,
                                               reference: list[int]) -> None:
    async def main() -> None:
        async with AsyncClient(server.socket_path, timeout=60) as c:
            first = asyncio.create_task(c.generate(prompt_ids=PROMPT, max_new_tokens=24,
                                                   stop_ids=[], request_id="same"))
            await asyncio.sleep(0)  # the first is sent
            with pytest.raises(ValueError, match="already in flight"):
                await c.generate(prompt_ids=PROMPT, max_new_tokens=4, request_id="same")
            # Before, the second overwrote the first's reply queue: it waited forever.
            reply = await asyncio.wait_for(first, 60)
            assert reply["tokens"] == reference and reply["request_id"] == "same"
            # Abandoned but maybe still running on the server: refused until its end.
            async for _ in c.stream(prompt_ids=PROMPT, max_new_tokens=2000, stop_ids=[],
                                    request_id="left"):
                break
            with pytest.raises(ValueError, match="already in flight"):
                await c.generate(prompt_ids=PROMPT, request_id="left")

    asyncio.run(main())
    with Client(server.socket_path) as c:
        for _ in c.stream(prompt_ids=PROMPT, max_new_tokens=2000, stop_ids=[],
                          request_id="left"):
            break
        with pytest.raises(ValueError, match="already in flight"):
            c.generate(prompt_ids=PROMPT, request_id="left")


def test_clients_have_a_default_timeout(tmp_path_factory: pytest.TempPathFactory) -> None:
    import socket

    d = tempfile.mkdtemp(prefix="hg", dir="/tmp")
    path = os.path.join(d, "mute.sock")
    mute = socket.socket(socket.AF_UNIX)  # listens, accepts nothing, answers nothing
    try:
        mute.bind(path)
        mute.listen(8)
        assert 0 < DEFAULT_TIMEOUT_S < float("inf")
        with Client(path) as c:
            assert c.sock.gettimeout() == DEFAULT_TIMEOUT_S
        with Client(path, timeout=0.2) as c, pytest.raises(TimeoutError):
            c.status()
        assert AsyncClient(path).timeout == DEFAULT_TIMEOUT_S

        async def main() -> None:
            async with AsyncClient(path, timeout=0.2) as c:
                with pytest.raises(TimeoutError):
                    await c.status()

        asyncio.run(main())
    finally:
        mute.close()
        shutil.rmtree(d, ignore_errors=True)


def test_a_client_process_never_imports_torch() -> None:
    code = ("import sys\n"
            "from hybridgraph import AsyncClient, Client, SamplingParams\n"
            "SamplingParams(temperature=0.5)\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
