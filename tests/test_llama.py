"""The decoder against HF transformers' LlamaForCausalLM with identical weights (CPU, float32)."""

from __future__ import annotations

import pytest
import torch

from hybridgraph.engine import Engine
from hybridgraph.model.llama import Transformer
from hybridgraph.model.loader import load_model

from .conftest import VARIANTS, make_hf_checkpoint, rel_max_diff

MAX_SEQ = 64
TOL = 1e-4


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """(our model, HF model, variant name) with the same weights, through save_pretrained."""
    directory = tmp_path_factory.mktemp(request.param)
    hf = make_hf_checkpoint(VARIANTS[request.param], directory, seed=7)
    ours, _ = load_model(str(directory))
    ours.setup_caches(4, MAX_SEQ)
    return ours, hf, request.param


def _ids(batch: int, length: int, vocab: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=gen)


@torch.inference_mode()
def test_prefill_logits_match_hf(pair: tuple[Transformer, torch.nn.Module, str]) -> None:
    ours, hf, _ = pair
    # Long enough to reach the llama3 schedule's slowed-down band (wavelength > 32).
    ids = _ids(2, 48, ours.config.vocab_size, seed=0)
    got, want = ours.prefill(ids), hf(ids).logits
    assert got.shape == want.shape == (2, 48, ours.config.vocab_size)
    assert rel_max_diff(got, want) <= TOL
    # Guard against a vacuous pass: the logits must vary across positions and rows.
    assert want[0, 0].sub(want[0, -1]).abs().max() > 0.1
    assert want[0].sub(want[1]).abs().max() > 0.1


@torch.inference_mode()
def test_tied_embeddings_share_one_tensor(pair: tuple[Transformer, torch.nn.Module, str]) -> None:
    ours, _, name = pair
    tied = ours.output.weight.data_ptr() == ours.tok_embeddings.weight.data_ptr()
    assert tied == (name == "tied")


@torch.inference_mode()
def test_right_padding_gives_the_same_last_logits(
        pair: tuple[Transformer, torch.nn.Module, str]) -> None:
    ours, hf, _ = pair
    lengths = [20, 11, 4, 1]
    full = _ids(len(lengths), max(lengths), ours.config.vocab_size, seed=1)
    padded = full.clone()
    for r, n in enumerate(lengths):
        padded[r, n:] = 0
    last = torch.tensor(lengths) - 1
    batched = ours.prefill(padded, last)
    for r, n in enumerate(lengths):
        alone = ours.prefill(full[r:r + 1, :n], torch.tensor([n - 1]))[0]
        reference = hf(full[r:r + 1, :n]).logits[0, -1]
        assert rel_max_diff(batched[r], alone) <= TOL, f"row {r}"
        assert rel_max_diff(batched[r], reference) <= TOL, f"row {r}"


@torch.inference_mode()
def test_step_by_step_decode_equals_full_forward(
        pair: tuple[Transformer, torch.nn.Module, str]) -> None:
    ours, hf, _ = pair
    # Two rows at different positions (prompts of 1 and 9 tokens), as a ragged batch decodes.
    total, starts = 40, [1, 9]
    seqs = _ids(2, total, ours.config.vocab_size, seed=2)
    want = hf(seqs).logits
    prompt = seqs[:, :max(starts)].clone()
    prompt[0, starts[0]:] = 0
    ours.prefill(prompt, torch.tensor(starts) - 1)
    pos = torch.tensor(starts)
    for _ in range(total - max(starts)):
        ids = seqs[torch.arange(2), pos]
        got = ours.decode(ids, pos, MAX_SEQ)
        for r in range(2):
            p = int(pos[r])
            assert rel_max_diff(got[r], want[r, p]) <= TOL, f"row {r} position {p}"
        pos = pos + 1


@torch.inference_mode()
def test_prefill_into_named_rows(pair: tuple[Transformer, torch.nn.Module, str]) -> None:
    """A prefill given `rows` writes those cache rows only; decoding there continues it."""
    ours, hf, _ = pair
    seq = _ids(1, 12, ours.config.vocab_size, seed=8)
    for cache in ours.caches:
        cache.k.fill_(7.0)
        cache.v.fill_(7.0)
    ours.prefill(seq[:, :11], torch.tensor([10]), rows=torch.tensor([2]))
    for cache in ours.caches:
        for r in (0, 1, 3):
            assert bool((cache.k[r] == 7.0).all() and (cache.v[r] == 7.0).all()), f"row {r}"
        assert not bool((cache.k[2, :, :11] == 7.0).any())
    # Rows 0, 1, 3 decode garbage beside it; row 2 must not notice.
    ids = torch.tensor([5, 5, int(seq[0, 11]), 5])
    got = ours.decode(ids, torch.tensor([3, 0, 11, 40]), MAX_SEQ)
    assert rel_max_diff(got[2], hf(seq).logits[0, 11]) <= TOL


@torch.inference_mode()
def test_decode_window_only_needs_to_exceed_position(
        pair: tuple[Transformer, torch.nn.Module, str]) -> None:
    ours, hf, _ = pair
    seq = _ids(1, 17, ours.config.vocab_size, seed=3)
    ours.prefill(seq[:, :16], torch.tensor([15]))
    got = ours.decode(seq[:, 16], torch.tensor([16]), 17)
    assert rel_max_diff(got[0], hf(seq).logits[0, 16]) <= TOL


@torch.inference_mode()
def test_decode_at_the_last_cache_position(pair: tuple[Transformer, torch.nn.Module, str]) -> None:
    ours, hf, _ = pair
    seq = _ids(1, MAX_SEQ, ours.config.vocab_size, seed=6)
    ours.prefill(seq[:, :-1], torch.tensor([MAX_SEQ - 2]))
    got = ours.decode(seq[:, -1], torch.tensor([MAX_SEQ - 1]), MAX_SEQ)
    assert rel_max_diff(got[0], hf(seq).logits[0, -1]) <= TOL


@torch.inference_mode()
def test_32_greedy_tokens_equal_hf_generate(
        pair: tuple[Transformer, torch.nn.Module, str]) -> None:
    ours, hf, _ = pair
    prompt = _ids(1, 7, ours.config.vocab_size, seed=4)
    engine = Engine(ours, _ByteLike(), mode="eager", max_batch=1, max_seq_len=MAX_SEQ)
    got = engine.generate(prompt[0].tolist(), max_new_tokens=32, stop_ids=[]).tokens
    out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=32,
                      do_sample=False, eos_token_id=None, pad_token_id=0)
    want = out[0, prompt.shape[1]:].tolist()
    assert len(want) == 32
    assert got == want
    # A degenerate model repeating one token would make the comparison weak.
    assert len(set(want)) > 3
    ours.setup_caches(4, MAX_SEQ)  # the engine resized the shared model's cache


class _ByteLike:
    bos_id, eos_ids = 1, (2,)

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        return ""


@pytest.fixture(scope="module")
def gqa_float32(gqa_checkpoint):
    directory, _ = gqa_checkpoint
    model, _ = load_model(str(directory))
    model.setup_caches(2, MAX_SEQ)
    return model


@pytest.mark.parametrize(("dtype", "tol"), [(torch.bfloat16, 0.1), (torch.float16, 0.02)])
@torch.inference_mode()
def test_half_precision_is_close_to_float32(gqa_checkpoint, gqa_float32: Transformer,
                                            dtype: torch.dtype, tol: float) -> None:
    directory, _ = gqa_checkpoint
    half, _ = load_model(str(directory), dtype=dtype)
    assert half.tok_embeddings.weight.dtype == dtype
    half.setup_caches(2, MAX_SEQ)
    ids = _ids(2, 24, half.config.vocab_size, seed=5)
    want = gqa_float32.prefill(ids)
    got = half.prefill(ids)
    assert got.dtype == torch.float32  # logits come back in float32 whatever the weights
    assert torch.isfinite(got).all()
    assert rel_max_diff(got, want) <= tol
    # Decode in half precision stays close too.
    step = half.decode(ids[:, 0], torch.tensor([24, 24]), MAX_SEQ)
    ref_ids = torch.cat([ids, ids[:, :1]], dim=1)
    assert rel_max_diff(step, gqa_float32.prefill(ref_ids)[:, 24]) <= tol
