"""Shared fixtures: tiny model configs and HF reference checkpoints with identical weights.

Everything is small enough for a 2-core CPU: the reference is a real transformers
`LlamaForCausalLM`, saved with `save_pretrained` and read back by our own loader.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from hybridgraph.model.config import ModelConfig

# Triton decides interpreted or compiled when triton.language is first imported, and any
# test module may import it (`import triton` alone does). Without CUDA the CPU tests run
# the kernels in its interpreter, so the switch is set here, before any test module loads
# (tests/triton_interpreter.py reads it).
if importlib.util.find_spec("triton") is not None and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# head_dim 16; vocab large enough that a greedy/sampled token is not trivially predictable.
TINY = ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2,
                   num_heads=4, num_kv_heads=2, max_position_embeddings=256, name="test-tiny")

# original_max_position_embeddings small enough that, at test lengths, every regime of
# the llama3 schedule (kept, ramped, slowed-down wavelengths) is exercised.
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 32}

VARIANTS: dict[str, ModelConfig] = {
    "multi-head": replace(TINY, num_kv_heads=4),
    "gqa": TINY,
    "llama3-rope": replace(TINY, rope_theta=500000.0, rope_scaling=LLAMA3_SCALING),
    "tied": replace(TINY, tie_word_embeddings=True),
}


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Weights large enough to give peaked, position-dependent logits; norm weights away
    from 1 so a norm loaded into the wrong slot shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if "norm" in name:
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.copy_(0.15 * noise)


def write_word_tokenizer(path: Path, vocab_size: int) -> None:
    """A WordLevel tokenizer.json of `vocab_size` words ("w3", "w4", ...) with Llama's
    special ids (0 unk, 1 <s>, 2 </s>) and BOS added: a model directory needs a tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                       special_tokens=[("<s>", 1)])
    tok.save(str(path))


def make_hf_checkpoint(config: ModelConfig, directory: Path, seed: int = 0,
                       **save_kwargs: Any):
    """A random HF LlamaForCausalLM of `config`, saved to `directory` with a word-level
    tokenizer.json; returns the model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = LlamaForCausalLM(LlamaConfig(**config.to_hf_dict())).float().eval()
    randomize_(hf, seed)
    hf.save_pretrained(directory, **save_kwargs)
    # save_pretrained writes generation_config.json from the config; these tests choose
    # their end ids themselves.
    (Path(directory) / "generation_config.json").unlink(missing_ok=True)
    write_word_tokenizer(Path(directory) / "tokenizer.json", config.vocab_size)
    return hf


@pytest.fixture(scope="module")
def sockdir() -> Iterator[str]:
    """A fresh directory for a module's server sockets, under /tmp: AF_UNIX paths are at
    most 107 bytes, and pytest's tmp_path can be longer."""
    d = tempfile.mkdtemp(prefix="hg", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def gqa_checkpoint(tmp_path_factory: pytest.TempPathFactory):
    """(directory, HF model) of the GQA variant; shared by loader, tokenizer and engine tests."""
    directory = tmp_path_factory.mktemp("gqa")
    return directory, make_hf_checkpoint(VARIANTS["gqa"], directory, seed=1)


def rel_max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())
