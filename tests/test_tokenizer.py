"""Byte-level tokenizer for presets; a model directory's tokenizer.json via `tokenizers`."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from hybridgraph.model.loader import load_model
from hybridgraph.model.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer


@pytest.mark.parametrize("text", ["Hello, my name is", "héllo wörld — 世界 🙂", "", "a\x00b\n"])
def test_byte_round_trip(text: str) -> None:
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids[0] == 1
    assert len(ids) == 1 + len(text.encode("utf-8"))
    assert all(3 <= i < 259 for i in ids[1:])
    assert tok.decode(ids) == text


def test_byte_layout_matches_sentencepiece_byte_fallback() -> None:
    # <0x41> ('A') is id 0x41 + 3 in Llama's vocabulary.
    assert ByteTokenizer(bos_id=None).encode("A") == [0x41 + 3]
    # pad, bos, eos and ids past the byte range decode to nothing.
    assert ByteTokenizer().decode([0, 1, 2, 72 + 3, 105 + 3, 259, 5000]) == "Hi"


def test_byte_decode_of_a_split_character_does_not_raise() -> None:
    ids = ByteTokenizer(bos_id=None).encode("é")
    assert ByteTokenizer().decode(ids[:1]) == "\ufffd"


def _word_tokenizer(path: Path) -> dict[str, int]:
    """A tiny WordLevel tokenizer with Llama's special ids, BOS added by the post-processor."""
    words = ["the", "capital", "of", "france", "is", "paris", "."]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: 3 + i for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(path))
    return vocab


def test_hf_tokenizer_json_is_picked_up_by_load_model(gqa_checkpoint, tmp_path: Path) -> None:
    directory, _ = gqa_checkpoint
    model_dir = Path(shutil.copytree(directory, tmp_path / "model"))
    vocab = _word_tokenizer(model_dir / "tokenizer.json")
    model, tok = load_model(str(model_dir))
    assert isinstance(tok, HFTokenizer)
    assert tok.bos_id == 1 and tok.eos_ids == (2,)
    ids = tok.encode("the capital of france is paris")
    assert ids == [1] + [vocab[w] for w in "the capital of france is paris".split()]
    assert max(ids) < model.config.vocab_size
    assert tok.decode(ids + [2]) == "the capital of france is paris"
    assert tok.encode("the moon")[-1] == vocab["<unk>"]


def test_without_tokenizer_json_bytes_are_used(tmp_path: Path) -> None:
    assert isinstance(load_tokenizer(tmp_path, 1, (2,)), ByteTokenizer)
    assert isinstance(load_tokenizer(None, 1, (2,)), ByteTokenizer)
    _word_tokenizer(tmp_path / "tokenizer.json")
    assert isinstance(load_tokenizer(tmp_path, 1, (2,)), HFTokenizer)
