"""The server's worker runs the batching scheduler: `hybridgraph serve --max-batch 4` as a
real process (tiny model, CPU). Concurrent requests share decode steps and still get
exactly their lone tokens; cancelling or dropping one leaves the others whole; SIGTERM
drains every row."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from hybridgraph.server.client import Client
from hybridgraph.server.launch import ServerProcess

PROMPTS = [[1] + [3 + (11 * i + 5 * j) % 250 for j in range(2 + 3 * i)] for i in range(8)]
N_NEW = [40 + 7 * i for i in range(8)]


@pytest.fixture(scope="module")
def server(sockdir: str) -> Iterator[ServerProcess]:
    with ServerProcess(os.path.join(sockdir, "b.sock"), "tiny",
                       ["--device", "cpu", "--max-batch", "4"]) as srv:
        yield srv


@pytest.fixture(scope="module")
def expected() -> dict[int, list[int]]:
    from hybridgraph.engine import Engine

    engine = Engine.load("tiny", device="cpu")
    return {i: engine.generate(p, N_NEW[i], stop_ids=[]).tokens for i, p in enumerate(PROMPTS)}


def _clients(path: str, which: list[int], cancel_at: dict[int, int] | None = None,
             drop_at: dict[int, int] | None = None,
             ) -> tuple[dict[int, list[tuple[float, int]]], dict[int, dict[str, Any]]]:
    """Run PROMPTS[i] for i in `which` concurrently, streamed; client i leaves its stream
    after cancel_at[i] tokens, or closes its connection after drop_at[i]. Returns
    (timestamped tokens, final replies)."""
    cancel_at, drop_at = cancel_at or {}, drop_at or {}
    got: dict[int, list[tuple[float, int]]] = {i: [] for i in which}
    replies: dict[int, dict[str, Any]] = {}
    errors: list[BaseException] = []
    go = threading.Barrier(len(which))

    def run(i: int) -> None:
        try:
            with Client(path, timeout=120) as c:
                go.wait()
                stream = c.stream(prompt_ids=PROMPTS[i], max_new_tokens=N_NEW[i], stop_ids=[])
                for token in stream:
                    got[i].append((time.perf_counter(), token))
                    if len(got[i]) == drop_at.get(i):
                        c.sock.close()  # gone without a word
                        return
                    if len(got[i]) == cancel_at.get(i):
                        break
                replies[i] = c.last_reply if i not in cancel_at else {}
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in which]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return got, replies


def test_concurrent_requests_share_steps_and_get_their_lone_tokens(
        server: ServerProcess, expected: dict[int, list[int]]) -> None:
    got, replies = _clients(server.socket_path, list(range(8)))
    for i in range(8):
        assert [t for _, t in got[i]] == expected[i], f"client {i}"
        assert replies[i]["tokens"] == expected[i] and replies[i]["finish_reason"] == "length"
    # Batched, not one after another: most requests were streaming at the same time as
    # another one (with one request at a time no two [first, last] spans overlap).
    spans = sorted((g[0][0], g[-1][0]) for g in got.values())
    overlaps = sum(b0 < a1 for (_, a1), (b0, _) in zip(spans[:-1], spans[1:], strict=True))
    assert overlaps >= 4, spans


def test_cancelled_and_dropped_streams_leave_the_others_whole(
        server: ServerProcess, expected: dict[int, list[int]]) -> None:
    got, replies = _clients(server.socket_path, [0, 1, 2, 3, 4], cancel_at={1: 5},
                            drop_at={3: 7})
    assert [t for _, t in got[1]] == expected[1][:5]
    assert [t for _, t in got[3]] == expected[3][:7]
    for i in (0, 2, 4):
        assert replies[i]["tokens"] == expected[i], f"client {i}"
    with Client(server.socket_path, timeout=30) as c:
        st = c.status()
    assert st["batch"]["max_batch"] == 4 and st["batch"]["live"] == 0


def test_sigterm_drains_every_row(sockdir: str, expected: dict[int, list[int]]) -> None:
    path = os.path.join(sockdir, "d.sock")
    with ServerProcess(path, "tiny", ["--device", "cpu", "--max-batch", "4",
                                      "--drain-s", "60"]) as srv:
        replies: dict[int, dict[str, Any]] = {}
        started = threading.Barrier(5)

        def run(i: int) -> None:
            with Client(path, timeout=120) as c:
                first = [True]

                def on_token(_t: int) -> None:
                    if first[0]:
                        first[0] = False
                        started.wait()

                replies[i] = c.generate(prompt_ids=PROMPTS[i], max_new_tokens=N_NEW[i],
                                        stop_ids=[], stream=True, on_token=on_token)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        started.wait()           # every request has its first token: all four are running
        srv.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        for t in threads:
            t.join()
        assert srv.proc.wait(60) == 0  # type: ignore[union-attr]
    for i in range(4):
        assert replies[i]["tokens"] == expected[i] and replies[i]["finish_reason"] == "length"


def test_socket_and_http_requests_share_one_batch(sockdir: str,
                                                  expected: dict[int, list[int]]) -> None:
    openai = pytest.importorskip("openai")
    path = os.path.join(sockdir, "h.sock")
    spans: dict[int, tuple[float, float]] = {}
    tokens: dict[int, list[int]] = {}
    errors: list[BaseException] = []
    with ServerProcess(path, "tiny", ["--device", "cpu", "--max-batch", "4"],
                       http="127.0.0.1:0") as srv:
        client = openai.OpenAI(base_url=f"{srv.http_url}/v1", api_key="none", max_retries=0,
                               timeout=120)
        go = threading.Barrier(4)

        def over_http(i: int) -> None:
            go.wait()
            times, ids = [], []
            for c in client.completions.create(model="tiny", prompt=PROMPTS[i],
                                               max_tokens=N_NEW[i], temperature=0, stream=True,
                                               extra_body={"stop_token_ids": []}):
                if c.choices and c.choices[0].model_extra["token_ids"]:
                    times.append(time.perf_counter())
                    ids += c.choices[0].model_extra["token_ids"]
            spans[i], tokens[i] = (times[0], times[-1]), ids

        def over_socket(i: int) -> None:
            with Client(path, timeout=120) as c:
                go.wait()
                times, ids = [], []
                for t in c.stream(prompt_ids=PROMPTS[i], max_new_tokens=N_NEW[i], stop_ids=[]):
                    times.append(time.perf_counter())
                    ids.append(t)
                spans[i], tokens[i] = (times[0], times[-1]), ids

        def guarded(fn: Any, i: int) -> None:
            try:
                fn(i)
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=guarded, args=(over_http if i % 2 else over_socket, i))
                   for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors
    for i in range(4):
        assert tokens[i] == expected[i], f"request {i} ({'http' if i % 2 else 'socket'})"
    # an HTTP request and a socket request were generating at the same time
    assert any(spans[h][0] < spans[s][1] and spans[s][0] < spans[h][1]
               for h in (1, 3) for s in (0, 2)), spans
