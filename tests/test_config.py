"""ModelConfig from HF config.json files (4.x and 5.x layouts), presets, and config errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from hybridgraph.model.config import PRESETS, ConfigError, ModelConfig, preset
from hybridgraph.model.llama import rope_inv_freq

# Trimmed copies of the public config.json files (shape fields verbatim).
LLAMA2_7B = {
    "architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2,
    "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
    "intermediate_size": 11008, "max_position_embeddings": 4096, "model_type": "llama",
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None,
    "tie_word_embeddings": False, "torch_dtype": "float16", "use_cache": True,
    "vocab_size": 32000,
}
TINYLLAMA = {
    "architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2,
    "hidden_act": "silu", "hidden_size": 2048, "intermediate_size": 5632,
    "max_position_embeddings": 2048, "model_type": "llama", "num_attention_heads": 32,
    "num_hidden_layers": 22, "num_key_value_heads": 4, "rms_norm_eps": 1e-05,
    "rope_scaling": None, "rope_theta": 10000.0, "tie_word_embeddings": False,
    "vocab_size": 32000,
}
MISTRAL_7B = {  # v0.2/v0.3 layout: no sliding window, theta 1e6
    "architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2,
    "hidden_act": "silu", "hidden_size": 4096, "intermediate_size": 14336,
    "max_position_embeddings": 32768, "model_type": "mistral", "num_attention_heads": 32,
    "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
    "rope_theta": 1000000.0, "sliding_window": None, "tie_word_embeddings": False,
    "vocab_size": 32000,
}
LLAMA31_8B = {  # transformers 4.x layout: rope_theta + rope_scaling
    "architectures": ["LlamaForCausalLM"], "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu", "hidden_size": 4096,
    "intermediate_size": 14336, "max_position_embeddings": 131072, "model_type": "llama",
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "vocab_size": 128256,
}
LLAMA2_13B = {**LLAMA2_7B, "hidden_size": 5120, "intermediate_size": 13824,
              "num_attention_heads": 40, "num_hidden_layers": 40, "num_key_value_heads": 40}
LLAMA2_70B = {**LLAMA2_7B, "hidden_size": 8192, "intermediate_size": 28672,
              "num_attention_heads": 64, "num_hidden_layers": 80, "num_key_value_heads": 8}
LLAMA31_70B = {**LLAMA31_8B, "hidden_size": 8192, "intermediate_size": 28672,
               "num_attention_heads": 64, "num_hidden_layers": 80, "num_key_value_heads": 8}


def _v5(d: dict[str, Any]) -> dict[str, Any]:
    """The same config as transformers 5.x writes it: one rope_parameters map."""
    out = {k: v for k, v in d.items() if k not in ("rope_theta", "rope_scaling")}
    out["rope_parameters"] = {"rope_theta": d.get("rope_theta", 10000.0),
                              **(d.get("rope_scaling") or {"rope_type": "default"})}
    return out


def _shape(cfg: ModelConfig) -> dict[str, Any]:
    d = cfg.to_dict()
    d.pop("name")
    return d


@pytest.mark.parametrize("layout", ["v4", "v5"])
@pytest.mark.parametrize(("hf", "name"), [(LLAMA2_7B, "llama-2-7b"),
                                          (TINYLLAMA, "tinyllama-1.1b"),
                                          (MISTRAL_7B, "mistral-7b"),
                                          (LLAMA31_8B, "llama-3.1-8b"),
                                          (LLAMA2_13B, "llama-2-13b"),
                                          (LLAMA2_70B, "llama-2-70b"),
                                          (LLAMA31_70B, "llama-3.1-70b")])
def test_public_configs_match_presets(hf: dict[str, Any], name: str, layout: str) -> None:
    cfg = ModelConfig.from_hf_dict(hf if layout == "v4" else _v5(hf))
    assert _shape(cfg) == _shape(PRESETS[name])
    assert torch.equal(rope_inv_freq(cfg), rope_inv_freq(PRESETS[name]))


def test_llama3_scaling_is_read_from_both_layouts() -> None:
    old = ModelConfig.from_hf_dict(LLAMA31_8B)
    new = ModelConfig.from_hf_dict(_v5(LLAMA31_8B))
    assert old.rope_theta == new.rope_theta == 500000.0
    assert old.rope_scaling is not None and old.rope_scaling["rope_type"] == "llama3"
    assert old.rope_scaling == new.rope_scaling
    # Scaling must actually change the long wavelengths, or the llama3 path is dead code.
    plain = rope_inv_freq(ModelConfig.from_hf_dict({**LLAMA31_8B, "rope_scaling": None}))
    scaled = rope_inv_freq(old)
    assert torch.allclose(scaled[0], plain[0])              # shortest wavelength kept
    assert torch.allclose(scaled[-1], plain[-1] / 8.0)      # longest slowed by `factor`


def test_gqa_and_defaults() -> None:
    cfg = ModelConfig.from_hf_dict(TINYLLAMA)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (32, 4, 64)
    # Llama-1 era configs have no num_key_value_heads: plain multi-head attention.
    legacy = {k: v for k, v in LLAMA2_7B.items() if k != "num_key_value_heads"}
    assert ModelConfig.from_hf_dict(legacy).num_kv_heads == 32
    assert ModelConfig.from_hf_dict(LLAMA2_7B).rope_theta == 10000.0
    assert ModelConfig.from_hf_dict(LLAMA31_8B).eos_token_ids == (128001, 128008, 128009)
    assert ModelConfig.from_hf_dict({**TINYLLAMA, "tie_word_embeddings": True}).tie_word_embeddings


def test_sliding_window_caps_the_sequence_length() -> None:
    # Mistral v0.1: full attention equals sliding-window attention only up to the window.
    cfg = ModelConfig.from_hf_dict({**MISTRAL_7B, "sliding_window": 4096})
    assert cfg.max_position_embeddings == 4096


def test_from_json_reads_a_file(tmp_path: Path) -> None:
    d = tmp_path / "TinyLlama-1.1B"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(TINYLLAMA))
    cfg = ModelConfig.from_json(d / "config.json")
    assert cfg.name == "TinyLlama-1.1B"
    assert _shape(cfg) == _shape(PRESETS["tinyllama-1.1b"])


@pytest.mark.parametrize(("name", "params"), [("llama-2-7b", 6_738_415_616),
                                              ("tinyllama-1.1b", 1_100_048_384),
                                              ("mistral-7b", 7_241_732_096),
                                              ("llama-3.1-8b", 8_030_261_248),
                                              ("llama-2-13b", 13_015_864_320),
                                              ("llama-2-70b", 68_976_648_192),
                                              ("llama-3.1-70b", 70_553_706_496)])
def test_presets_have_public_parameter_counts(name: str, params: int) -> None:
    assert preset(name).num_params() == params


def test_tiny_preset_is_tiny_and_matches_byte_tokenizer() -> None:
    tiny = preset("tiny")
    assert tiny.vocab_size == 3 + 256
    assert tiny.num_params() * 4 < 4 * 2**20


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_through_hf_dict(name: str) -> None:
    cfg = PRESETS[name]
    assert ModelConfig.from_hf_dict(cfg.to_hf_dict(), name=name) == cfg


def test_preset_overrides_and_unknown_preset() -> None:
    assert preset("tiny", num_layers=3).num_layers == 3
    with pytest.raises(ConfigError, match="unknown preset 'llama-9b'"):
        preset("llama-9b")
    with pytest.raises(ConfigError, match="num_kv_heads"):
        preset("tiny", num_kv_heads=3)


@pytest.mark.parametrize(("change", "pattern"), [
    ({"hidden_size": None}, "hidden_size"),
    ({"num_hidden_layers": "32"}, "num_(hidden_)?layers"),
    ({"num_hidden_layers": 0}, "num_(hidden_)?layers"),
    ({"vocab_size": -5}, "vocab_size"),
    ({"num_attention_heads": "32"}, "num_(attention_)?heads"),
    ({"num_attention_heads": 30}, "not divisible by num_heads 30"),
    ({"num_key_value_heads": 5}, "not divisible by num_kv_heads 5"),
    ({"head_dim": 256}, "head_dim"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling.low_freq_factor"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling type 'yarn'"),
    ({"rope_scaling": "llama3"}, "wrong type"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
])
def test_malformed_fields_raise_config_error_naming_them(change: dict[str, Any],
                                                        pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        ModelConfig.from_hf_dict({**LLAMA31_8B, **change})


@pytest.mark.parametrize("missing", ["vocab_size", "hidden_size", "intermediate_size",
                                     "num_hidden_layers", "num_attention_heads"])
def test_missing_field_is_named(missing: str) -> None:
    d = {k: v for k, v in TINYLLAMA.items() if k != missing}
    with pytest.raises(ConfigError, match=f"missing the field '{missing}'"):
        ModelConfig.from_hf_dict(d)


@pytest.mark.parametrize(("archs", "model_type"), [(["GPT2LMHeadModel"], "gpt2"),
                                                   (["Qwen2ForCausalLM"], "qwen2"),
                                                   ([], "falcon")])
def test_unsupported_architecture(archs: list[str], model_type: str) -> None:
    with pytest.raises(ConfigError, match="unsupported") as info:
        ModelConfig.from_hf_dict({**TINYLLAMA, "architectures": archs, "model_type": model_type})
    assert (archs[0] if archs else model_type) in str(info.value)


@pytest.mark.parametrize(("text", "pattern"), [("{not json", "malformed config.json"),
                                               ("[1, 2]", "not a JSON object"),
                                               ("", "malformed config.json")])
def test_malformed_json_file(tmp_path: Path, text: str, pattern: str) -> None:
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ConfigError, match=pattern):
        ModelConfig.from_json(tmp_path / "config.json")


def test_missing_json_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no config.json"):
        ModelConfig.from_json(tmp_path / "config.json")
