"""Concurrent clients against a running server: what each one sees, and the total.

N clients, each on its own connection, each sending its requests one after another
(closed loop: a client sends its next request when the last one has finished), all
streaming. The prompt/output mix is fixed and the same for every run, so runs with
batching on and off, or on other machines, serve the same work. Times are taken on the
client: TTFT from sending a request to its first token, per-token latency between
consecutive tokens of one request, aggregate throughput as every token any client
received over the wall time from the first send to the last token.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from hybridgraph.bench.table import make_prompt, summarize
from hybridgraph.server.client import AsyncClient

# (prompt tokens, new tokens) per request, cycled; the same mix for every configuration.
DEFAULT_MIX: tuple[tuple[int, int], ...] = ((32, 128), (128, 64), (16, 192), (64, 128))


@dataclass
class ClientLog:
    ttft_ms: list[float] = field(default_factory=list)
    token_ms: list[float] = field(default_factory=list)
    tokens: int = 0
    errors: list[str] = field(default_factory=list)


def _stamper(times: list[float]) -> Any:
    return lambda _token: times.append(time.perf_counter())


async def _one_client(path: str, index: int, requests: int, mix: Sequence[tuple[int, int]],
                      vocab: int, start: asyncio.Event, log: ClientLog,
                      last_token: list[float]) -> None:
    async with AsyncClient(path) as client:
        await start.wait()
        for r in range(requests):
            prompt_len, new = mix[(index + r) % len(mix)]
            prompt = make_prompt(prompt_len, vocab, seed=index * 1009 + r)
            times: list[float] = []
            t_send = time.perf_counter()
            try:
                reply = await client.generate(prompt_ids=prompt, max_new_tokens=new, stop_ids=[],
                                              stream=True, on_token=_stamper(times))
            except Exception as e:  # counted and reported: a load run must not hide failures
                log.errors.append(f"{type(e).__name__}: {e}")
                continue
            if len(times) != len(reply.get("tokens", ())):
                log.errors.append(f"streamed {len(times)} tokens, result has "
                                  f"{len(reply.get('tokens', ()))}")
            if times:
                log.ttft_ms.append((times[0] - t_send) * 1e3)
                log.token_ms += [(b - a) * 1e3 for a, b in zip(times[:-1], times[1:], strict=True)]
                log.tokens += len(times)
                last_token[0] = max(last_token[0], times[-1])


async def _run(path: str, clients: int, requests: int, mix: Sequence[tuple[int, int]],
               vocab: int) -> tuple[list[ClientLog], float]:
    start, logs, last = asyncio.Event(), [ClientLog() for _ in range(clients)], [0.0]
    tasks = [asyncio.create_task(_one_client(path, i, requests, mix, vocab, start, logs[i], last))
             for i in range(clients)]
    await asyncio.sleep(0.05)  # every connection open before the clock starts
    t0 = time.perf_counter()
    start.set()
    await asyncio.gather(*tasks)
    return logs, max(last[0] - t0, 1e-9)


def measure_serve(socket_path: str, clients: int, requests: int = 4,
                  mix: Sequence[tuple[int, int]] = DEFAULT_MIX, vocab: int = 259,
                  ) -> dict[str, Any]:
    """Run `clients` concurrent streaming clients of `requests` requests each. Returns the
    medians and P99s (ms) over all requests / token gaps, the worst client's median
    per-token latency, aggregate tokens/s, and the per-client logs."""
    logs, wall_s = asyncio.run(_run(socket_path, clients, requests, mix, vocab))
    ttft = summarize([x for c in logs for x in c.ttft_ms])
    tok = summarize([x for c in logs for x in c.token_ms])
    per_client = [summarize(c.token_ms)["median"] for c in logs if c.token_ms]
    total = sum(c.tokens for c in logs)
    return {"clients": clients, "requests": sum(len(c.ttft_ms) for c in logs),
            "tokens": total, "wall_s": wall_s, "tokens_per_s": total / wall_s,
            "ttft_median_ms": ttft["median"], "ttft_p99_ms": ttft["p99"],
            "token_median_ms": tok["median"], "token_p99_ms": tok["p99"],
            "worst_client_token_median_ms": max(per_client, default=float("nan")),
            "errors": [e for c in logs for e in c.errors], "logs": logs}
