"""Tokenizers rebuilt from GGUF metadata. The byte-level BPE ("gpt2") case runs on the real
SmolLM2 file in test_gguf.py; here a small SentencePiece ("llama") vocabulary, checked
against transformers' own GGUF tokenizer conversion, and the refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hybridgraph.model.gguf_file import GGUFError, read_gguf
from hybridgraph.model.gguf_tokenizer import gguf_tokenizer

WORDS = ["▁", "h", "e", "l", "o", "w", "r", "d", "▁h", "ll", "llo", "▁he", "▁hello", "▁w", "or",
         "▁wor", "ld", "▁world", "é", "▁caf", "c", "a", "f", "▁c", "▁ca"]


def write_spm_gguf(path: Path, model: str = "llama", pre: str | None = None) -> None:
    import gguf

    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + WORDS
    types = [2, 3, 3] + [6] * 256 + [1] * len(WORDS)
    # Longer pieces merge first; single characters are never merges.
    scores = [0.0] * 259 + [-float(i) if len(w) > 1 else -100.0 - i for i, w in enumerate(WORDS)]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model(model)
    if pre is not None:
        w.add_tokenizer_pre(pre)
    w.add_token_list(pieces)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tensor("token_embd.weight", np.zeros((len(pieces), 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("text", ["hello world", " hello  world", "café hello", "xyz",
                                  "hello\nworld", "▁hello", "<s>hello</s>"])
def test_sentencepiece_vocab_matches_transformers(tmp_path: Path, text: str) -> None:
    from transformers import AutoTokenizer

    write_spm_gguf(tmp_path / "spm.gguf")
    ref = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="spm.gguf")
    ours, info = gguf_tokenizer(read_gguf(tmp_path / "spm.gguf"))
    ids = ours.encode(text).ids
    assert ids == ref.encode(text)
    assert ids[0] == 1 and info["add_bos"]  # SentencePiece vocabularies add BOS by default
    assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)


def test_an_unknown_tokenizer_model_is_named(tmp_path: Path) -> None:
    write_spm_gguf(tmp_path / "bert.gguf", model="bert")
    with pytest.raises(GGUFError, match="tokenizer model 'bert'.*not supported.*--tokenizer"):
        gguf_tokenizer(read_gguf(tmp_path / "bert.gguf"))


def test_an_unknown_pre_tokenizer_is_named(tmp_path: Path) -> None:
    write_spm_gguf(tmp_path / "qwen.gguf", model="gpt2", pre="qwen2")
    with pytest.raises(GGUFError, match="tokenizer.ggml.pre 'qwen2' is not supported"):
        gguf_tokenizer(read_gguf(tmp_path / "qwen.gguf"))
