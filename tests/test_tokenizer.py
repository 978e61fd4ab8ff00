"""Byte-level tokenizer for presets; a model directory's tokenizer.json via `tokenizers`."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from hybridgraph.model.loader import LoadError, load_model
from hybridgraph.model.tokenizer import ByteTokenizer, HFTokenizer, TokenizerError, load_tokenizer


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


def test_a_directory_without_tokenizer_json_is_refused(tmp_path: Path) -> None:
    # Bytes are for presets with random weights only: a real model given byte ids prints
    # garbage without a word of warning.
    with pytest.raises(TokenizerError, match="no tokenizer.json in .*--tokenizer"):
        load_tokenizer(tmp_path, 1, (2,))
    assert isinstance(load_tokenizer(None, 1, (2,)), ByteTokenizer)
    _word_tokenizer(tmp_path / "tokenizer.json")
    assert isinstance(load_tokenizer(tmp_path, 1, (2,)), HFTokenizer)


def test_load_model_refuses_a_directory_without_a_tokenizer(gqa_checkpoint,
                                                            tmp_path: Path) -> None:
    directory, _ = gqa_checkpoint
    model_dir = Path(shutil.copytree(directory, tmp_path / "model"))
    (model_dir / "tokenizer.json").unlink()
    with pytest.raises(LoadError, match="no tokenizer.json"):
        load_model(str(model_dir))
    # --tokenizer points at one elsewhere.
    _word_tokenizer(tmp_path / "elsewhere.json")
    _, tok = load_model(str(model_dir), tokenizer=str(tmp_path / "elsewhere.json"))
    assert tok.encode("the capital") == [1, 3, 4]


def test_a_corrupt_tokenizer_json_is_named(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="cannot read the tokenizer .*tokenizer.json"):
        load_tokenizer(tmp_path, 1, (2,))


@pytest.mark.parametrize("text", ["café ☕ naïve", "日本語 🙂", "plain"])
def test_byte_stream_decoder_keeps_split_characters_whole(text: str) -> None:
    tok = ByteTokenizer()
    stream = tok.stream_decoder()
    pieces = [stream.step(i) for i in tok.encode(text)] + [stream.flush()]
    assert "".join(pieces) == text
    assert "\ufffd" not in "".join(pieces)


def test_encode_without_special_tokens_leaves_out_bos(tmp_path: Path) -> None:
    _word_tokenizer(tmp_path / "tokenizer.json")
    tok = load_tokenizer(tmp_path, 1, (2,))
    assert tok.encode("the capital", add_special_tokens=False) == [3, 4]
    assert ByteTokenizer().encode("A", add_special_tokens=False) == [0x41 + 3]
