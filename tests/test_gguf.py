"""GGUF loading, on the real embedded SmolLM2-135M-Instruct (Q4_1) and on small bad files.

The reference is HF transformers' own GGUF reader (load_gguf_checkpoint: its dequantization
and its Q/K un-permutation) feeding a LlamaForCausalLM; `from_pretrained(gguf_file=)` itself
needs `accelerate`, which is not a dependency here, so the state dict is loaded by hand.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from hybridgraph.engine import Engine
from hybridgraph.model.gguf import _unpermute, gguf_config
from hybridgraph.model.gguf_file import GGUFError, read_gguf
from hybridgraph.model.loader import LoadError, load_model, resolve_source

from .conftest import rel_max_diff

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smol_path() -> Path:
    return resolve_source("smollm2-135m")


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine.load("smollm2-135m", device="cpu", max_seq_len=512)


@pytest.fixture(scope="module")
def hf_reference(smol_path: Path):
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    # The shape from our metadata reading (checked on its own above); the weights, their
    # dequantization and un-permutation all from transformers.
    cfg = gguf_config(read_gguf(smol_path)).to_hf_dict()
    hf = LlamaForCausalLM(LlamaConfig(**cfg)).float().eval()
    tensors = load_gguf_checkpoint(str(smol_path), return_tensors=True, model_to_load=hf)
    missing, unexpected = hf.load_state_dict(tensors["tensors"], strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied to the embeddings
    hf.tie_weights()
    return hf


def chat_ids(engine: Engine, messages=QUESTION) -> list[int]:
    tok = engine.tokenizer
    text = tok.chat_template.render(messages, bos_token=tok.bos_token, eos_token=tok.eos_token)
    return tok.encode(text, add_special_tokens=False)


def test_metadata_gives_the_smollm2_config(smol_path: Path) -> None:
    cfg = gguf_config(read_gguf(smol_path))
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads) == (30, 576, 9, 3)
    assert cfg.tie_word_embeddings and cfg.max_position_embeddings == 8192
    assert cfg.rope_theta == 100000.0 and cfg.eos_token_ids == (2,)


@torch.inference_mode()
def test_float32_logits_equal_transformers(engine: Engine, hf_reference) -> None:
    ids = torch.tensor([chat_ids(engine)])
    engine.model.setup_caches(1, engine.max_seq_len)
    ours = engine.model.prefill(ids)
    ref = hf_reference(ids).logits
    assert rel_max_diff(ours, ref) <= 1e-5


def test_32_greedy_tokens_equal_transformers(engine: Engine, hf_reference) -> None:
    # One teacher-forced transformers forward over prompt + our 32 tokens: if its argmax at
    # every position is our next token, its greedy decoding is exactly ours (induction),
    # at the cost of one forward instead of 32.
    ids = chat_ids(engine, [{"role": "user", "content": "Tell me a story about a cat."}])
    ours = engine.generate(ids, 32, ignore_eos=True).tokens
    with torch.inference_mode():
        logits = hf_reference(torch.tensor([ids + ours])).logits[0]
    assert logits[len(ids) - 1:-1].argmax(-1).tolist() == ours


def test_tokenizer_matches_transformers(engine: Engine) -> None:
    # ids from transformers 5.24's AutoTokenizer.from_pretrained(..., gguf_file=) on this file
    tok = engine.tokenizer
    assert tok.encode("Hello world 12345") == [19556, 905, 216, 33, 34, 35, 36, 37]
    assert tok.encode("café ☕ naïve  spaces\n\nnew") == [83, 1939, 2756, 4636, 242, 239, 15486,
                                                        46494, 216, 5600, 198, 198, 2241]
    assert tok.encode("<|im_start|>user\nhi<|im_end|>") == [1, 4093, 198, 6004, 2]


def test_chat_answer_names_paris_and_stops_at_end_of_turn(engine: Engine) -> None:
    res = engine.generate(chat_ids(engine), 24, stop=())
    text = engine.tokenizer.decode(res.tokens)
    assert "Paris" in text
    assert res.finish_reason == "stop" and res.tokens[-1] == 2  # <|im_end|>
    assert "<|im_end|>" not in text


def test_stop_string_ends_generation_and_is_left_out(engine: Engine) -> None:
    res = engine.generate(chat_ids(engine), 24, stop=["Paris"])
    assert res.finish_reason == "stop"
    assert "Paris" not in res.text and res.text.startswith("The capital of France")
    assert res.tokens[-1] != 2  # ended by the string, before the end-of-turn token


def test_streamed_text_keeps_multibyte_characters(engine: Engine) -> None:
    ids = chat_ids(engine, [{"role": "user",
                             "content": "Write the word café and a coffee emoji ☕ three times."}])
    deltas: list[str] = []
    res = engine.generate(ids, 10, on_text=lambda row, token, delta: deltas.append(delta))
    streamed = "".join(deltas)
    assert streamed == res.text
    assert "☕" in streamed and "é" in streamed and "\ufffd" not in streamed


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "Q4_1", "F16", "Q6_K"])
def test_dequantization_equals_the_gguf_package(kind: str, tmp_path: Path) -> None:
    import gguf

    from hybridgraph.model.gguf import dequantize

    qtype = gguf.GGMLQuantizationType[kind]
    w = np.random.default_rng(0).standard_normal((4, 256)).astype(np.float32)
    if kind == "Q6_K":  # the package cannot quantize K-quants: random blocks, real layout
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        raw = np.random.default_rng(1).integers(0, 256, (4, 256 // block * size), np.uint8)
        raw[:, -2:] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)  # finite scales
    else:
        raw = gguf.quants.quantize(w, qtype)
    writer = gguf.GGUFWriter(str(tmp_path / "q.gguf"), "llama")
    writer.add_tensor("t", raw, raw_shape=raw.shape, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    g = read_gguf(tmp_path / "q.gguf")
    ours = dequantize(g, g.tensor("t"))
    assert ours.shape == (4, 256)
    ref = gguf.quants.dequantize(raw, qtype).reshape(4, 256)
    assert torch.equal(ours.float(), torch.from_numpy(ref.astype(np.float32)))


def test_unpermute_inverts_llama_cpp_permute() -> None:
    def permute(w: torch.Tensor, heads: int) -> torch.Tensor:  # llama.cpp convert_hf_to_gguf
        return (w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:])
                .swapaxes(1, 2).reshape(w.shape))

    w = torch.randn(3 * 8, 5)
    assert torch.equal(_unpermute(permute(w, 3), 3), w)
    assert not torch.equal(permute(w, 3), w)


# ------------------------------------------------------------------------- bad inputs

def test_a_non_gguf_file_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(LoadError, match="model.gguf is not a GGUF file"):
        load_model(str(bad))


def test_a_truncated_file_is_named(tmp_path: Path, smol_path: Path) -> None:
    cut = tmp_path / "cut.gguf"
    with open(smol_path, "rb") as f:
        cut.write_bytes(f.read(2_000_000))
    with pytest.raises(GGUFError, match="cut.gguf is truncated"):
        read_gguf(cut)


def _write_gguf(path: Path, arch: str, tensor_dtype=None, hidden: int = 8,
                file_type: int | None = None, rope_freqs: np.ndarray | None = None) -> None:
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(500000.0)
    w.add_vocab_size(16)
    if file_type is not None:
        w.add_file_type(file_type)
    data = np.zeros((16, hidden), dtype=np.int8 if tensor_dtype is not None else np.float32)
    w.add_tensor("token_embd.weight", data, raw_dtype=tensor_dtype)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_llama31_rope_table_is_accepted_and_others_refused(tmp_path: Path) -> None:
    from dataclasses import replace

    from hybridgraph.model.config import ModelConfig
    from hybridgraph.model.llama import rope_inv_freq

    # head_dim 64, theta 5e5: long wavelengths are slowed 8x, a ramp between (llama.cpp's
    # rope_freqs holds plain / scaled frequency for each pair).
    base = ModelConfig(16, 128, 16, 1, 2, 2, rope_theta=500000.0)
    want = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    table = (rope_inv_freq(base) / rope_inv_freq(replace(base, rope_scaling=want))).numpy()
    assert table.max() == pytest.approx(8.0) and table.min() == 1.0
    _write_gguf(tmp_path / "l31.gguf", "llama", hidden=128, rope_freqs=table)
    assert gguf_config(read_gguf(tmp_path / "l31.gguf")).rope_scaling == want
    _write_gguf(tmp_path / "odd.gguf", "llama", hidden=128, rope_freqs=table * 1.5)
    with pytest.raises(GGUFError, match="rope_freqs.weight is not Llama 3.1's RoPE schedule"):
        gguf_config(read_gguf(tmp_path / "odd.gguf"))


@pytest.mark.parametrize("file_type, dtype", [(0, torch.float32), (1, torch.float16),
                                              (32, torch.bfloat16), (3, None)])
def test_stored_dtype_follows_the_file_type(tmp_path: Path, file_type: int, dtype) -> None:
    from hybridgraph.model.loader import auto_dtype, stored_dtype

    path = tmp_path / "f.gguf"
    _write_gguf(path, "llama", file_type=file_type)
    assert stored_dtype(str(path)) == dtype
    assert auto_dtype(str(path), "cpu") == torch.float32  # a CPU computes in float32


def test_an_unsupported_architecture_is_named(tmp_path: Path) -> None:
    path = tmp_path / "q.gguf"
    _write_gguf(path, "qwen2")
    with pytest.raises(LoadError, match="unsupported architecture 'qwen2'"):
        load_model(str(path))


def test_an_unsupported_tensor_type_is_named(tmp_path: Path) -> None:
    import gguf

    from hybridgraph.model.gguf import dequantize

    path = tmp_path / "i8.gguf"
    _write_gguf(path, "llama", gguf.GGMLQuantizationType.I8)
    g = read_gguf(path)
    with pytest.raises(GGUFError, match="token_embd.weight has quantization type I8"):
        dequantize(g, g.tensor("token_embd.weight"))
