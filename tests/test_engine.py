"""Engine on the CPU: request validation without broken state, stopping, seeded sampling,
batching, eager vs jit backends, cancellation, and the CUDA-only modes."""

from __future__ import annotations

from typing import Any

import pytest

from hybridgraph.engine import Engine, GenerationResult, RequestError, SamplingParams
from hybridgraph.model.loader import load_model
from hybridgraph.model.tokenizer import ByteTokenizer

MAX_SEQ = 64
VOCAB = 259  # the tiny preset
PROMPT = [1, 72, 101, 108, 108, 111]
PROMPTS = [[1, 40, 50, 60, 70, 80, 90, 100, 110], [1, 200], [1, 30, 31, 32, 33]]


def _engine(mode: str = "eager", backend: str = "compile", max_batch: int = 4,
            tokenizer: Any = None) -> Engine:
    model, tok = load_model("tiny", "cpu", seed=0)
    return Engine(model, tokenizer or tok, mode=mode, backend=backend, max_batch=max_batch,
                  max_seq_len=MAX_SEQ)


@pytest.fixture(scope="module")
def eager() -> Engine:
    return _engine()


@pytest.fixture(scope="module")
def jit_engines() -> dict[str, Engine]:
    # max_batch 1: warm-up compiles one batch bucket per backend, which keeps CI fast.
    return {b: _engine("jit", b, max_batch=1) for b in ("compile", "torchscript", "eager")}


@pytest.fixture(scope="module")
def reference() -> list[int]:
    """Greedy tokens of PROMPT from an engine that has served nothing else."""
    return _engine().generate(PROMPT, 12, stop_ids=[]).tokens


# ------------------------------------------------------------------------- validation

BAD_REQUESTS: list[tuple[str, dict[str, Any], str]] = [
    ("empty prompt", {"prompt_ids": []}, "prompt"),
    ("prompt not a list", {"prompt_ids": "hello"}, "prompt"),
    ("prompt fills the cache", {"prompt_ids": [5] * MAX_SEQ}, "prompt"),
    ("prompt longer than the cache", {"prompt_ids": [5] * (MAX_SEQ + 10)}, "prompt"),
    ("id == vocab", {"prompt_ids": [1, 5, VOCAB]}, "prompt"),
    ("id > vocab", {"prompt_ids": [1, 10**9]}, "prompt"),
    ("negative id", {"prompt_ids": [1, -1, 5]}, "prompt"),
    ("float id", {"prompt_ids": [1, 5.0]}, "prompt"),
    ("bool id", {"prompt_ids": [1, True, 5]}, "prompt"),
    ("str id", {"prompt_ids": [1, "5"]}, "prompt"),
    ("None id", {"prompt_ids": [None, 1]}, "prompt"),
    ("temperature < 0", {"sampling": SamplingParams(temperature=-0.5)}, "temperature"),
    ("temperature nan", {"sampling": SamplingParams(temperature=float("nan"))}, "temperature"),
    ("top_p 0", {"sampling": SamplingParams(temperature=1.0, top_p=0.0)}, "top_p"),
    ("top_p 1.5", {"sampling": SamplingParams(temperature=1.0, top_p=1.5)}, "top_p"),
    ("top_k < -1", {"sampling": SamplingParams(temperature=1.0, top_k=-2)}, "top_k"),
    ("top_k float", {"sampling": SamplingParams(temperature=1.0, top_k=2.5)}, "top_k"),
    ("seed < 0", {"sampling": SamplingParams(temperature=1.0, seed=-3)}, "seed"),
    ("max_new_tokens 0", {"max_new_tokens": 0}, "max_new_tokens"),
    ("max_new_tokens < 0", {"max_new_tokens": -4}, "max_new_tokens"),
    ("max_new_tokens str", {"max_new_tokens": "8"}, "max_new_tokens"),
    ("max_new_tokens float", {"max_new_tokens": 8.0}, "max_new_tokens"),
    ("prompt + new tokens overflow", {"prompt_ids": [5] * 40, "max_new_tokens": 30},
     "max_new_tokens"),
]


@pytest.mark.parametrize("mode", ["eager", "jit"])
@pytest.mark.parametrize(("case", "change", "field"), BAD_REQUESTS,
                         ids=[c[0] for c in BAD_REQUESTS])
def test_bad_request_is_refused_and_engine_stays_healthy(
        request: pytest.FixtureRequest, reference: list[int], mode: str, case: str,
        change: dict[str, Any], field: str) -> None:
    engine = (request.getfixturevalue("eager") if mode == "eager"
              else request.getfixturevalue("jit_engines")["compile"])
    args: dict[str, Any] = {"prompt_ids": PROMPT, "max_new_tokens": 8, "stop_ids": []}
    args.update(change)
    with pytest.raises(RequestError) as info:
        engine.generate(**args)
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")
    # The same engine serves the next request exactly as a fresh one does.
    assert engine.generate(PROMPT, 12, stop_ids=[]).tokens == reference


def test_error_messages_name_the_problem(eager: Engine) -> None:
    with pytest.raises(RequestError, match=rf"token id {VOCAB} is outside the vocabulary"):
        eager.generate([1, VOCAB])
    with pytest.raises(RequestError, match="do not fit the KV cache"):
        eager.generate([5] * (MAX_SEQ + 1))
    with pytest.raises(RequestError, match=r"top_p: must be in \(0, 1\], got 1.5"):
        eager.generate(PROMPT, sampling=SamplingParams(1.0, top_p=1.5))


def test_bad_batch_shapes(eager: Engine, reference: list[int]) -> None:
    with pytest.raises(RequestError) as info:
        eager.generate_batch([PROMPT] * 5, 4)   # max_batch is 4
    assert info.value.field == "prompts"
    with pytest.raises(RequestError) as info:
        eager.generate_batch([PROMPT, PROMPT], 4, [SamplingParams()])
    assert info.value.field == "sampling"
    # One bad prompt in a batch refuses the whole batch before anything runs.
    with pytest.raises(RequestError):
        eager.generate_batch([PROMPT, [1, -2]], 4)
    assert eager.generate(PROMPT, 12, stop_ids=[]).tokens == reference


def test_a_failing_callback_leaves_no_broken_state(eager: Engine, reference: list[int]) -> None:
    def boom(row: int, token: int) -> bool:
        raise RuntimeError("client went away")

    with pytest.raises(RuntimeError, match="client went away"):
        eager.generate(PROMPT, 12, stop_ids=[], on_token=boom)
    assert eager.generate(PROMPT, 12, stop_ids=[]).tokens == reference


# ----------------------------------------------------------------------- generation

def test_max_new_tokens_is_respected(eager: Engine, reference: list[int]) -> None:
    for n in (1, 2, 3, 12):
        res = eager.generate(PROMPT, n, stop_ids=[])
        assert res.tokens == reference[:n]
        assert res.finish_reason == "length"
        assert res.prompt_len == len(PROMPT)
        assert len(res.token_ms) == n - 1 and res.ttft_ms > 0
        assert all(ms > 0 for ms in res.token_ms)


def test_longest_request_that_fits(eager: Engine) -> None:
    # Prompt + new tokens exactly fill the cache: the last decode uses its last position.
    res = eager.generate([1] + [7] * 31, MAX_SEQ - 32, stop_ids=[])
    assert len(res.tokens) == MAX_SEQ - 32


def test_stops_on_stop_ids(eager: Engine, reference: list[int]) -> None:
    stop = reference[4]
    first = reference.index(stop)
    res = eager.generate(PROMPT, 12, stop_ids=[stop])
    assert res.tokens == reference[:first + 1]
    assert res.finish_reason == "stop"


def test_stops_on_the_tokenizers_eos() -> None:
    free = _engine(max_batch=1).generate(PROMPT, 12, stop_ids=[]).tokens
    eos = free[3]
    engine = _engine(max_batch=1, tokenizer=ByteTokenizer(bos_id=1, eos_ids=(eos,)))
    res = engine.generate(PROMPT, 12)  # stop_ids=None: the tokenizer's EOS ids
    assert res.tokens == free[:free.index(eos) + 1]
    assert res.finish_reason == "stop"
    # An explicit empty list switches EOS stopping off.
    assert engine.generate(PROMPT, 12, stop_ids=[]).tokens == free


def test_seeded_sampling(eager: Engine) -> None:
    hot = SamplingParams(temperature=1.5, seed=1234)
    a = eager.generate(PROMPT, 16, hot, stop_ids=[]).tokens
    b = eager.generate(PROMPT, 16, hot, stop_ids=[]).tokens
    c = eager.generate(PROMPT, 16, SamplingParams(temperature=1.5, seed=4321), stop_ids=[]).tokens
    assert a == b
    assert a != c
    # Sampling really samples: not the greedy continuation.
    assert a != eager.generate(PROMPT, 16, stop_ids=[]).tokens
    # No seed: a fresh one per request.
    u = eager.generate(PROMPT, 16, SamplingParams(temperature=1.5), stop_ids=[]).tokens
    v = eager.generate(PROMPT, 16, SamplingParams(temperature=1.5), stop_ids=[]).tokens
    assert u != v


def test_top_k_one_is_greedy(eager: Engine, reference: list[int]) -> None:
    res = eager.generate(PROMPT, 12, SamplingParams(temperature=2.0, top_k=1, seed=5),
                         stop_ids=[])
    assert res.tokens == reference


@pytest.mark.parametrize("sampling", [None, SamplingParams(temperature=1.2, top_p=0.9, seed=77)],
                         ids=["greedy", "seeded"])
def test_batch_equals_single_runs(eager: Engine, sampling: SamplingParams | None) -> None:
    s = sampling or SamplingParams()
    singles = [eager.generate(p, 10, s, stop_ids=[]).tokens for p in PROMPTS]
    batch = eager.generate_batch(PROMPTS, 10, [s] * 3, stop_ids=[])
    assert [r.tokens for r in batch] == singles
    assert [r.prompt_len for r in batch] == [len(p) for p in PROMPTS]
    # The prompts really differ in what they produce, or the check proves little.
    assert len({tuple(t) for t in singles}) == 3


def test_batch_rows_stop_independently(eager: Engine) -> None:
    singles = [eager.generate(p, 10, stop_ids=[]).tokens for p in PROMPTS]
    stop = singles[1][2]
    batch = eager.generate_batch(PROMPTS, 10, stop_ids=[stop])
    for res, alone in zip(batch, singles, strict=True):
        want = alone[:alone.index(stop) + 1] if stop in alone else alone
        assert res.tokens == want
        assert res.finish_reason == ("stop" if stop in alone else "length")


def test_on_token_false_cancels(eager: Engine, reference: list[int]) -> None:
    seen: list[tuple[int, int]] = []

    def stop_after_three(row: int, token: int) -> bool:
        seen.append((row, token))
        return len(seen) < 3

    res = eager.generate(PROMPT, 12, stop_ids=[], on_token=stop_after_three)
    assert res.finish_reason == "cancelled"
    assert res.tokens == reference[:3]
    assert seen == [(0, t) for t in reference[:3]]


def test_cancelling_one_row_keeps_the_others(eager: Engine) -> None:
    singles = [eager.generate(p, 8, stop_ids=[]).tokens for p in PROMPTS]
    batch = eager.generate_batch(PROMPTS, 8, stop_ids=[],
                                 on_token=lambda row, token: row != 1)
    assert batch[1].finish_reason == "cancelled" and batch[1].tokens == singles[1][:1]
    assert [batch[0].tokens, batch[2].tokens] == [singles[0], singles[2]]
    assert batch[0].finish_reason == batch[2].finish_reason == "length"


def test_result_timings() -> None:
    res = GenerationResult([5, 6, 7], 4, ttft_ms=10.0, token_ms=[2.0, 3.0])
    assert res.decode_ms_per_token == 2.5
    assert res.total_ms == 15.0
    assert res.tokens_per_s == pytest.approx(200.0)


# --------------------------------------------------------------------------- modes

def test_jit_backends_give_the_eager_tokens(eager: Engine, jit_engines: dict[str, Engine],
                                            reference: list[int]) -> None:
    hot = SamplingParams(temperature=0.9, top_k=50, top_p=0.95, seed=11)
    sampled = eager.generate(PROMPT, 12, hot, stop_ids=[]).tokens
    for backend, engine in jit_engines.items():
        assert engine.mode == "jit" and engine.ops.backend == backend
        assert engine.generate(PROMPT, 12, stop_ids=[]).tokens == reference, backend
        # Counter-based sampling: the same seed gives the same tokens in every backend.
        assert engine.generate(PROMPT, 12, hot, stop_ids=[]).tokens == sampled, backend


def test_warmup_does_not_count_as_requests(jit_engines: dict[str, Engine]) -> None:
    engine = _engine("jit", "eager", max_batch=2)
    assert engine.requests_served == 0
    engine.generate(PROMPT, 2)
    assert engine.stats()["requests_served"] == 1
    assert engine.stats()["mode"] == "jit"


def test_cpu_defaults_to_eager() -> None:
    model, tok = load_model("tiny", "cpu")
    assert Engine(model, tok, max_seq_len=MAX_SEQ).mode == "eager"


@pytest.mark.parametrize("mode", ["graph", "hybrid"])
def test_cuda_modes_on_cpu_raise(mode: str) -> None:
    model, tok = load_model("tiny", "cpu")
    with pytest.raises(ValueError, match=rf"mode '{mode}' needs a CUDA device"):
        Engine(model, tok, mode=mode)


def test_bad_engine_options() -> None:
    model, tok = load_model("tiny", "cpu")
    with pytest.raises(ValueError, match="unknown mode 'turbo'"):
        Engine(model, tok, mode="turbo")
    with pytest.raises(ValueError, match="unknown dtype 'float64'"):
        Engine.load("tiny", device="cpu", dtype="float64")
    with pytest.raises(ValueError, match="unknown dynamic backend"):
        Engine(model, tok, mode="jit", backend="tvm")


def test_load_from_a_directory(gqa_checkpoint) -> None:
    directory, _ = gqa_checkpoint
    engine = Engine.load(str(directory), device="cpu", max_seq_len=MAX_SEQ)
    assert engine.mode == "eager" and engine.config.vocab_size == 97
    assert len(engine.generate([1, 5, 9], 6, stop_ids=[]).tokens) == 6


@pytest.mark.parametrize("sizes", [{"max_seq_len": 0}, {"max_seq_len": -5}, {"max_batch": 0}],
                         ids=["seq0", "seq-5", "batch0"])
def test_bad_engine_sizes_raise_clear_errors(sizes: dict[str, int]) -> None:
    model, tok = load_model("tiny", "cpu")
    with pytest.raises(ValueError, match=next(iter(sizes))):
        Engine(model, tok, **sizes)


@pytest.mark.parametrize("passes", [False, True])
def test_the_kernels_check_is_awaited_at_start_up_and_a_failure_falls_back(
        monkeypatch: pytest.MonkeyPatch, passes: bool) -> None:
    """The Engine builds its Steps without waiting for the kernels' self-check (it waits
    after the capture's dry pass). Where the check then fails, the blocks and the JIT
    samplers serve, the reason is the check's, and tokens equal a kernel-less engine's;
    where it passes, the kernels and their samplers stay. (On the CPU the check is a
    stand-in: the kernels themselves need a GPU.)"""
    import torch

    from hybridgraph.kernels import selfcheck
    monkeypatch.setattr(selfcheck, "cannot_run", lambda *_: None)  # as on a GPU
    waited: list[bool] = []

    def check(*_: Any) -> tuple[bool, str]:
        waited.append(True)
        return (True, "ok") if passes else (False, "attention differs (injected)")

    monkeypatch.setattr(selfcheck, "check_kernels", check)
    model, tok = load_model("tiny", "cpu", torch.float16, seed=0)
    e = Engine(model, tok, mode="jit", kernels="triton", max_seq_len=64)
    assert waited  # awaited before the engine was ready
    if passes:
        assert e.steps.kernels == "triton" and e.ops.sample == e.steps.fast.sample
        return
    assert e.steps.fast is None and e.steps.kernels == "inductor"
    assert e.stats()["kernels_reason"] == "attention differs (injected)"
    assert e.ops is e.runner.ops and e.ops.backend == "compile"
    assert getattr(e.ops.sample, "__self__", None) is None  # not TritonDecode's method
    model2, _ = load_model("tiny", "cpu", torch.float16, seed=0)
    ref = Engine(model2, tok, mode="jit", kernels="inductor", max_seq_len=64)
    assert e.generate([1, 5, 9], 6, stop_ids=[]).tokens == \
        ref.generate([1, 5, 9], 6, stop_ids=[]).tokens
