"""Issue 13 on the GPU: the batching scheduler over captured graphs (hybrid and graph
modes, float32) gives every request exactly its lone tokens, while the decode bucket
crosses up and down as rows join and leave, and every step replays a graph."""

import random

import pytest
import torch

from hybridgraph.engine import Engine, SamplingParams
from hybridgraph.model.tokenizer import ByteTokenizer
from hybridgraph.scheduler import Scheduler

from ..conftest import randomize_
from .conftest import SMALL, needs_cuda, small_model

pytestmark = [pytest.mark.gpu, needs_cuda]

MAX_BATCH = 8
SAMPLERS = [SamplingParams(), SamplingParams(0.8, seed=5), SamplingParams(1.0, top_k=20, seed=6),
            SamplingParams(0.9, top_p=0.9, seed=7)]


@pytest.fixture(scope="module", params=["hybrid", "graph"])
def engine(request: pytest.FixtureRequest) -> Engine:
    torch.backends.cuda.matmul.allow_tf32 = False
    model = small_model()
    randomize_(model, seed=4)  # peaked logits: no near-ties for rounding to flip
    return Engine(model, ByteTokenizer(), mode=request.param, max_batch=MAX_BATCH,
                  max_seq_len=512, coverage="16,64,128")


def _requests(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        length = rng.choice([1, 5, 16, 40, 100])
        out.append({"prompt_ids": [rng.randrange(3, SMALL.vocab_size) for _ in range(length)],
                    "max_new_tokens": rng.choice([1, 3, 20, 60, 150]),
                    "sampling": SAMPLERS[i % len(SAMPLERS)], "stop_ids": []})
    return out


def _waves(n: int) -> tuple[list[dict], list[int]]:
    """n waves of MAX_BATCH requests 200 boundaries apart, each wave's later arrivals (its
    higher rows) shorter: the bucket climbs 1 -> 2 -> 4 -> 8 as a wave is admitted (one
    prefill a boundary) and steps back down 8 -> 4 -> 2 -> 1 as its tail finishes."""
    rng = random.Random(1)
    news = [150, 110, 80, 60, 40, 20, 8, 2]
    reqs, arrivals = [], []
    for w in range(n):
        for i in range(MAX_BATCH):
            length = rng.choice([1, 5, 16, 40, 100])
            reqs.append({"prompt_ids": [rng.randrange(3, SMALL.vocab_size) for _ in range(length)],
                         "max_new_tokens": news[i], "sampling": SAMPLERS[i % len(SAMPLERS)],
                         "stop_ids": []})
            arrivals.append(200 * w)
    return reqs, arrivals


def _serve(sched: Scheduler, reqs: list[dict], arrivals: list[int]) -> list:
    tickets, boundary = [None] * len(reqs), 0
    while any(t is None for t in tickets) or not sched.idle:
        for i, at in enumerate(arrivals):
            if at == boundary:
                tickets[i] = sched.submit(**reqs[i])
        sched.step()
        boundary += 1
    return tickets


def test_batched_equals_alone_with_graphs(engine: Engine,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    reqs, arrivals = _waves(3)
    want = [engine.generate(**r).tokens for r in reqs]
    fallbacks = engine.graphs.stats.fallbacks
    buckets: list[int] = []
    real = engine.decode_rows

    def spy(b, active, max_pos, kind):
        buckets.append(b)
        real(b, active, max_pos, kind)

    monkeypatch.setattr(engine, "decode_rows", spy)
    tickets = _serve(Scheduler(engine), reqs, arrivals)
    for i, t in enumerate(tickets):
        assert t.result.tokens == want[i], f"request {i}"
    assert engine.graphs.stats.fallbacks == fallbacks  # every step replayed a graph
    ups = sum(b > a for a, b in zip(buckets[:-1], buckets[1:], strict=True))
    downs = sum(b < a for a, b in zip(buckets[:-1], buckets[1:], strict=True))
    assert ups >= 3 and downs >= 3 and max(buckets) == MAX_BATCH and buckets[-1] == 1


def test_lone_request_through_the_scheduler(engine: Engine) -> None:
    req = {"prompt_ids": list(range(3, 40)), "max_new_tokens": 64, "stop_ids": [],
           "sampling": SamplingParams(0.7, seed=3)}
    want = engine.generate(**req).tokens
    sched = Scheduler(engine)
    t = sched.submit(**req)
    sched.run_until_idle()
    assert t.result.tokens == want and sched.steps_by_bucket == {1: 63}


def test_cancel_mid_batch_with_pipelining(engine: Engine) -> None:
    reqs = _requests(6, seed=3)
    for r in reqs:
        r["max_new_tokens"] = 40
    want = [engine.generate(**r).tokens for r in reqs]
    sched = Scheduler(engine, max_batch=4)
    tickets = [sched.submit(**r) for r in reqs]
    for _ in range(10):
        sched.step()
    tickets[1].cancel()
    sched.run_until_idle()
    assert tickets[1].result.finish_reason == "cancelled"
    assert tickets[1].result.tokens == want[1][:len(tickets[1].result.tokens)]
    for i in (0, 2, 3, 4, 5):
        assert tickets[i].result.tokens == want[i], f"request {i}"
