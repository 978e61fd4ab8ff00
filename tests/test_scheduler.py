"""The batching scheduler on the CPU (eager): every request gets exactly the tokens it gets
alone, rows are never shared while live, what a finished row leaves is never read, and
admission, cancellation and bucket choice follow the policy."""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch

from hybridgraph.engine import Engine
from hybridgraph.model.loader import random_model
from hybridgraph.request import RequestError, SamplingParams
from hybridgraph.runtime.dynamic import choose_bucket
from hybridgraph.scheduler import Scheduler, Ticket

from .conftest import TINY, randomize_

MAX_SEQ = 48
MAX_BATCH = 16


class _Tok:
    bos_id, eos_ids = 1, (2,)


@pytest.fixture(scope="module")
def engine() -> Engine:
    model = random_model(TINY, torch.device("cpu"), torch.float32)
    randomize_(model, seed=3)  # peaked logits: tokens that depend on the prompt
    return Engine(model, _Tok(), mode="eager", max_batch=MAX_BATCH, max_seq_len=MAX_SEQ)


SAMPLERS = [SamplingParams(), SamplingParams(0.8, seed=11), SamplingParams(1.0, top_k=5, seed=3),
            SamplingParams(0.7, top_p=0.8, seed=99), SamplingParams(1.3, 7, 0.9, seed=2**40)]


def _requests(n: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        length = rng.randint(1, 20)
        out.append({"prompt_ids": [rng.randrange(3, TINY.vocab_size) for _ in range(length)],
                    "max_new_tokens": rng.randint(1, MAX_SEQ - length),
                    "sampling": SAMPLERS[i % len(SAMPLERS)], "stop_ids": []})
    return out


def _with_stops(engine: Engine, reqs: list[dict[str, Any]]) -> None:
    """Every third request stops on a token it produces midway when run freely."""
    for r in reqs[::3]:
        tokens = engine.generate(**r).tokens
        r["stop_ids"] = [tokens[len(tokens) // 2]]


def _alone(engine: Engine, req: dict[str, Any]) -> tuple[list[int], str]:
    res = engine.generate(**req)
    return res.tokens, res.finish_reason


def _poison_free_rows(sched: Scheduler) -> None:
    """Garbage (finite, huge) in every free row's cache: read by anyone, it shows."""
    for cache in sched.engine.model.caches:
        for r in sched.free:
            cache.k[r].fill_(3e3)
            cache.v[r].fill_(-3e3)


def _run(sched: Scheduler, reqs: list[dict[str, Any]], arrivals: list[int],
         poison: bool = True) -> list[Ticket]:
    """Submit request i at boundary arrivals[i]; run until every request is done."""
    tickets: list[Ticket | None] = [None] * len(reqs)
    boundary = 0
    while any(t is None for t in tickets) or not sched.idle:
        for i, at in enumerate(arrivals):
            if at == boundary:
                tickets[i] = sched.submit(**reqs[i])
        sched.step()
        if poison:
            _poison_free_rows(sched)
        _check_rows(sched)
        boundary += 1
    return [t for t in tickets if t is not None]


def _check_rows(sched: Scheduler) -> None:
    bufs = sched.engine.bufs
    assert set(sched.live).isdisjoint(sched.free)
    assert sorted([*sched.live, *sched.free]) == list(range(sched.max_batch))
    for row, t in sched.live.items():
        assert t.row == row and not t.done
    # positions never run past the cache
    assert int(bufs.pos.max()) < MAX_SEQ


@pytest.mark.parametrize(("n", "max_batch", "seed"), [(8, 8, 0), (20, 16, 1), (32, 8, 2)])
def test_concurrent_requests_get_their_lone_tokens(engine: Engine, n: int, max_batch: int,
                                                   seed: int) -> None:
    reqs = _requests(n, seed)
    _with_stops(engine, reqs)
    want = [_alone(engine, r) for r in reqs]
    rng = random.Random(seed)
    arrivals = sorted(rng.choice([0, 0, 0, 1, 3, 7, 12]) for _ in reqs)
    sched = Scheduler(engine, max_batch=max_batch)
    tickets = _run(sched, reqs, arrivals)
    got = [(t.result.tokens, t.result.finish_reason) for t in tickets]
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g == w, f"request {i} ({reqs[i]['sampling']}) differs in a batch"
    # Non-trivial: rows were shared, reused, and decode ran in more than one bucket.
    assert len(sched.steps_by_bucket) >= 2
    assert any(len(t.result.tokens) > 8 for t in tickets)
    assert any(r == "stop" and len(w) > 1 for w, r in want)
    assert sched.idle and sorted(sched.free) == list(range(max_batch))


def test_poisoning_a_live_row_would_show(engine: Engine) -> None:
    """The poison above is strong enough: put into a *live* row, it changes the tokens."""
    req = {"prompt_ids": [7, 8, 9, 10], "max_new_tokens": 12, "stop_ids": []}
    want, _ = _alone(engine, req)
    sched = Scheduler(engine, max_batch=2)
    t = sched.submit(**req)
    sched.step()
    for cache in engine.model.caches:
        cache.k[0, :, :3].fill_(3e3)
        cache.v[0, :, :3].fill_(-3e3)
    sched.run_until_idle()
    assert t.result.tokens[0] == want[0] and t.result.tokens != want


def test_cancelled_request_frees_its_row_and_others_are_unaffected(engine: Engine) -> None:
    reqs = _requests(6, seed=5)
    for r in reqs:
        r["max_new_tokens"], r["stop_ids"] = 20, []
        r["prompt_ids"] = r["prompt_ids"][:10]
    want = [_alone(engine, r) for r in reqs]
    sched = Scheduler(engine, max_batch=6)
    seen: list[int] = []
    tickets = [sched.submit(**r) for r in reqs[:5]]
    # request 2 cancels itself from its callback at its 4th token; request 4 is cancelled
    # from outside between boundaries
    tickets[2].on_token = lambda tok: len(tickets[2].result.tokens) < 4
    tickets[4].on_done = lambda t: seen.append(t.result.finish_reason == "cancelled")
    for _ in range(6):
        sched.step()
    row2, row4 = 2, 4
    assert tickets[2].done and tickets[2].result.finish_reason == "cancelled"
    assert tickets[2].result.tokens == want[2][0][:4]
    assert row2 in sched.free
    tickets[4].cancel()
    sched.step()
    assert tickets[4].done and seen == [True] and row4 in sched.free
    assert tickets[4].result.tokens == want[4][0][:len(tickets[4].result.tokens)]
    late = sched.submit(**reqs[5])  # takes the lowest free row: the cancelled one
    sched.step()
    assert late.row == row2
    sched.run_until_idle()
    for i in (0, 1, 3, 5):
        t = late if i == 5 else tickets[i]
        assert (t.result.tokens, t.result.finish_reason) == want[i]


def test_cancel_while_queued(engine: Engine) -> None:
    sched = Scheduler(engine, max_batch=1)
    a = sched.submit([3, 4, 5], 6, stop_ids=[])
    b = sched.submit([6, 7], 6, stop_ids=[])
    b.cancel()
    sched.step()
    assert b.done and b.result.tokens == [] and b.result.finish_reason == "cancelled"
    sched.run_until_idle()
    assert a.result.finish_reason == "length" and len(a.result.tokens) == 6


def test_arrival_is_admitted_at_the_next_boundary(engine: Engine) -> None:
    sched = Scheduler(engine, max_batch=2)
    a = sched.submit([3, 4, 5], 10, stop_ids=[])
    for _ in range(3):
        sched.step()
    b = sched.submit([9, 8], 4, stop_ids=[])
    c = sched.submit([10, 11], 4, stop_ids=[])   # no free row for it yet
    boundary = sched.boundaries
    sched.step()
    # admitted into the free row, prefilled, and in this boundary's decode step already
    assert b.admitted_at == boundary and b.row == 1 and len(b.result.tokens) == 2
    assert c.row is None and sched.queued() == 1
    assert len(a.result.tokens) == 5              # a kept decoding through b's prefill
    while not b.done:
        sched.step()
    sched.step()
    assert c.admitted_at == sched.boundaries - 1 and c.row == 1   # the row b freed
    sched.run_until_idle()
    assert [len(t.result.tokens) for t in (a, b, c)] == [10, 4, 4]


def test_fifo_admission_and_prefill_budget(engine: Engine) -> None:
    sched = Scheduler(engine, max_batch=4, prefills_per_step=2)
    tickets = [sched.submit([3 + i, 4], 3, stop_ids=[]) for i in range(7)]
    sched.step()
    assert [t.row for t in tickets[:3]] == [0, 1, None]   # two prefills per boundary
    sched.run_until_idle()
    order = [t.admitted_at for t in tickets]
    assert order == sorted(order)                           # FIFO


def test_no_row_reused_while_live(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    holders: dict[int, Ticket] = {}
    sched = Scheduler(engine, max_batch=4)
    real = engine.prefill_row

    def spy(row: int, prompt: list[int], sampling: SamplingParams) -> int:
        prev = holders.get(row)
        assert prev is None or prev.done, f"row {row} handed out while its request is live"
        holders[row] = sched.live[row]
        return real(row, prompt, sampling)

    monkeypatch.setattr(engine, "prefill_row", spy)
    reqs = _requests(12, seed=9)
    _run(sched, reqs, [0] * 6 + [2] * 6)
    assert len(holders) == 4


def test_decode_uses_the_smallest_bucket_holding_the_highest_live_row(
        engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    buckets: list[tuple[int, int]] = []
    sched = Scheduler(engine, max_batch=8)
    real = engine.decode_rows

    def spy(b: int, active: list[int], max_pos: int, kind: str) -> None:
        top = max(sched.live)
        assert b == choose_bucket(top + 1, engine.batch_buckets)
        assert active[b:] == [0] * (len(active) - b)
        buckets.append((b, top))
        real(b, active, max_pos, kind)

    monkeypatch.setattr(engine, "decode_rows", spy)
    long = sched.submit([3, 4, 5], 40, stop_ids=[])
    short = [sched.submit([6 + i], 24 - 2 * i, stop_ids=[]) for i in range(7)]  # high rows leave first
    sched.run_until_idle()
    seen = [b for b, _ in buckets]
    top = seen.index(8)
    # up one bucket at a time as rows join, down as they leave, to row 0 alone
    assert seen[:top + 1] == sorted(seen[:top + 1]) and {1, 2, 4} <= set(seen[:top])
    assert seen[top:] == sorted(seen[top:], reverse=True) and {4, 2, 1} <= set(seen[top:])
    assert long.result.finish_reason == "length" and all(t.done for t in short)


def test_masked_rows_hold_their_positions(engine: Engine) -> None:
    sched = Scheduler(engine, max_batch=4)
    a = sched.submit([3, 4], 4, stop_ids=[])
    b = sched.submit([5, 6, 7], 20, stop_ids=[])
    while not a.done:
        sched.step()
    assert b.row == 1
    held = int(engine.bufs.pos[0])
    for _ in range(5):
        sched.step()
        assert int(engine.bufs.pos[0]) == held    # row 0 is free, masked in bucket 2
    sched.run_until_idle()
    assert b.result.finish_reason == "length"


def test_requests_that_fill_the_cache(engine: Engine) -> None:
    reqs = [{"prompt_ids": [3] * (MAX_SEQ - 9), "max_new_tokens": 9, "stop_ids": []},
            {"prompt_ids": [4], "max_new_tokens": MAX_SEQ - 1, "stop_ids": []},
            {"prompt_ids": [5, 6], "max_new_tokens": 3, "stop_ids": []}]
    want = [_alone(engine, r) for r in reqs]
    tickets = _run(Scheduler(engine, max_batch=4), reqs, [0, 0, 1])
    assert [(t.result.tokens, t.result.finish_reason) for t in tickets] == want


def test_engine_generate_after_the_scheduler(engine: Engine) -> None:
    prompts = [[3, 4, 5], [6, 7], [8]]
    before = [r.tokens for r in engine.generate_batch(prompts, 6, stop_ids=[])]
    sched = Scheduler(engine, max_batch=4)
    for p in prompts + [[9, 9]]:
        sched.submit(p, 3, stop_ids=[])
    sched.run_until_idle()  # leaves the prefill row at 3 and some rows masked
    assert [r.tokens for r in engine.generate_batch(prompts, 6, stop_ids=[])] == before


def test_a_failing_callback_ends_only_its_request(engine: Engine) -> None:
    sched = Scheduler(engine, max_batch=2)

    def boom(token: int) -> None:
        raise RuntimeError("client gone")

    bad = sched.submit([3, 4], 6, stop_ids=[], on_token=boom)
    good = sched.submit([5, 6], 6, stop_ids=[])
    sched.run_until_idle()
    assert bad.result.finish_reason == "error" and isinstance(bad.error, RuntimeError)
    assert good.result.tokens == _alone(engine, {"prompt_ids": [5, 6], "max_new_tokens": 6,
                                                 "stop_ids": []})[0]


def test_lone_request_uses_row_zero_and_bucket_one(engine: Engine) -> None:
    sched = Scheduler(engine)
    served = engine.requests_served
    t = sched.submit([3, 4, 5], 8, stop_ids=[])
    sched.run_until_idle()
    assert engine.requests_served == served + 1
    assert sched.steps_by_bucket == {1: 7}
    assert sched.stats() == {"max_batch": MAX_BATCH, "live": 0, "queued": 0,
                             "prefills_per_step": 1, "boundaries": 7,
                             "steps_by_bucket": {"1": 7}}
    assert t.result.tokens == _alone(engine, {"prompt_ids": [3, 4, 5], "max_new_tokens": 8,
                                              "stop_ids": []})[0]
    assert t.result.ttft_ms > 0 and len(t.result.token_ms) == 7


@pytest.mark.parametrize(("change", "field"), [
    ({"prompt_ids": []}, "prompt"), ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"prompt_ids": [3] * 40, "max_new_tokens": 20}, "max_new_tokens"),
    ({"sampling": SamplingParams(top_p=0.0)}, "top_p"), ({"stop_ids": ["x"]}, "stop_ids"),
    ({"sampling": {"temperature": 1.0}}, "sampling")])
def test_bad_requests_are_refused_at_submit(engine: Engine, change: dict[str, Any],
                                            field: str) -> None:
    sched = Scheduler(engine)
    args: dict[str, Any] = {"prompt_ids": [3, 4], "max_new_tokens": 4, **change}
    with pytest.raises(RequestError) as e:
        sched.submit(**args)
    assert e.value.field == field and sched.idle


@pytest.mark.parametrize("kwargs", [{"max_batch": 0}, {"max_batch": MAX_BATCH + 1},
                                    {"prefills_per_step": 0}])
def test_bad_scheduler_options(engine: Engine, kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        Scheduler(engine, **kwargs)


def test_jit_mode_matches_alone() -> None:
    """Compiled sampling and preprocessing see rows at any offset of the step buffers."""
    model = random_model(TINY, torch.device("cpu"), torch.float32)
    randomize_(model, seed=3)
    engine = Engine(model, _Tok(), mode="jit", max_batch=2, max_seq_len=MAX_SEQ)
    reqs = _requests(5, seed=4)
    want = [_alone(engine, r) for r in reqs]
    tickets = _run(Scheduler(engine), reqs, [0, 0, 0, 2, 5], poison=False)
    assert [(t.result.tokens, t.result.finish_reason) for t in tickets] == want


def test_generate_leaves_rows_and_mask_alone_when_they_hold(engine: Engine) -> None:
    """Engine.generate's lone path: the row and mask buffers are written only when a
    scheduler left them changed (version counters count in-place writes)."""
    bufs = engine.bufs
    engine.generate([3, 4, 5], 4, stop_ids=[])
    rows_v, active_v = bufs.rows._version, bufs.active._version
    engine.generate([6, 7], 4, stop_ids=[])
    assert (bufs.rows._version, bufs.active._version) == (rows_v, active_v)
    sched = Scheduler(engine, max_batch=2)
    sched.submit([3, 4], 3, stop_ids=[])
    sched.submit([5, 6], 3, stop_ids=[])
    sched.run_until_idle()          # row 1 prefilled, rows masked: both buffers changed
    engine.generate([6, 7], 4, stop_ids=[])
    assert bufs.rows._version > rows_v and bufs.active._version > active_v
    assert bufs.first_row == 0 and bool(bufs.active.eq(1).all())


def test_stop_strings_and_text_deltas_match_alone() -> None:
    """Per-row text: stop strings cut the text and end the row, deltas add up to it, as in
    Engine.generate; ignore_eos leaves only the given stop ids."""
    from hybridgraph.model.tokenizer import ByteTokenizer

    model = random_model(TINY, torch.device("cpu"), torch.float32)
    randomize_(model, seed=3)
    engine = Engine(model, ByteTokenizer(), mode="eager", max_batch=4, max_seq_len=MAX_SEQ)
    reqs = _requests(8, seed=6)
    for i, r in enumerate(reqs):
        r.pop("stop_ids")
        r["max_new_tokens"] = max(r["max_new_tokens"], 12)
        text = engine.tokenizer.decode(engine.generate(**r, stop_ids=[]).tokens)
        if i % 2 == 0 and len(text) > 8:
            r["stop"] = [text[len(text) // 2:len(text) // 2 + 2]]
        r["ignore_eos"] = i % 3 == 0

    def alone(r: dict[str, Any]) -> tuple[Any, ...]:
        deltas: list[str] = []
        res = engine.generate(**r, on_text=lambda _row, _tok, d: deltas.append(d))
        return res.tokens, res.finish_reason, res.text, "".join(deltas)

    want = [alone(r) for r in reqs]
    assert any(w[1] == "stop" and "stop" in r for w, r in zip(want, reqs, strict=True))
    sched = Scheduler(engine)
    deltas: list[list[str]] = [[] for _ in reqs]
    tickets = [sched.submit(**r, on_text=lambda _tok, d, i=i: deltas[i].append(d))
               for i, r in enumerate(reqs)]
    sched.run_until_idle()
    got = [(t.result.tokens, t.result.finish_reason, t.result.text, "".join(deltas[i]))
           for i, t in enumerate(tickets)]
    assert got == want


def test_tensor_parallel_engines_batch_one_row_only(engine: Engine,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from dataclasses import replace

    monkeypatch.setattr(engine, "engine_config", replace(engine.engine_config, tp=2))
    with pytest.raises(ValueError, match="tp 2"):
        Scheduler(engine)
    assert Scheduler(engine, max_batch=1).max_batch == 1


def test_pipelined_scheduler_delivers_every_last_token(engine: Engine) -> None:
    """One step ahead (as on CUDA): when no row owes another launch, the decode still in
    flight is read, so requests finish (this hung on the GPU before it was fixed)."""
    reqs = _requests(6, seed=21)
    want = [_alone(engine, r) for r in reqs]
    sched = Scheduler(engine)
    sched.pipelined = True
    tickets = [sched.submit(**r) for r in reqs]
    for _ in range(10 * MAX_SEQ):
        if sched.idle:
            break
        sched.step()
    assert sched.idle, "requests left waiting for a token that stays in flight"
    assert [(t.result.tokens, t.result.finish_reason) for t in tickets] == want
