"""ModelConfig: the shape of a Llama-family decoder, from an HF config.json or a preset."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
SUPPORTED_MODEL_TYPES = ("llama", "mistral")
LLAMA3_SCALING_FIELDS = ("factor", "low_freq_factor", "high_freq_factor",
                         "original_max_position_embeddings")


class ConfigError(ValueError):
    """A config.json that is missing, malformed or describes a model we do not run."""


def read_json_object(path: Path, what: str) -> dict[str, Any]:
    """The JSON object in the file at `path`; a ConfigError naming `what` (the file's role,
    e.g. "config.json") if it is not valid JSON or not an object."""
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"malformed {what} at {path}: {e}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"malformed {what} at {path}: not a JSON object")
    return d


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # llama3-style scaling: {"factor", "low_freq_factor", "high_freq_factor",
    # "original_max_position_embeddings"}; None for plain RoPE.
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    bos_token_id: int | None = 1
    eos_token_ids: tuple[int, ...] = (2,)
    name: str = "custom"
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def num_params(self) -> int:
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        kv = self.num_kv_heads * self.head_dim
        per_layer = h * (h + 2 * kv) + h * h + 3 * h * i + 2 * h
        head = 0 if self.tie_word_embeddings else v * h
        return v * h + self.num_layers * per_layer + h + head

    def validate(self) -> ModelConfig:
        positive = ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                    "num_heads", "num_kv_heads", "max_position_embeddings")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads {self.num_heads} is not divisible by num_kv_heads {self.num_kv_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim {self.head_dim} must be even for RoPE")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in ("llama3", "default", None):
                raise ConfigError(f"rope_scaling type {kind!r} is not supported (only llama3)")
            # Checked here, not when the RoPE table is built: a KeyError deep inside
            # setup_caches would not say which config field is wrong.
            for key in LLAMA3_SCALING_FIELDS if kind != "default" else ():
                value = self.rope_scaling.get(key)
                if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                    raise ConfigError(f"rope_scaling.{key} must be a positive number, "
                                      f"got {value!r}")
            if kind != "default" and (self.rope_scaling["high_freq_factor"]
                                      <= self.rope_scaling["low_freq_factor"]):
                raise ConfigError("rope_scaling.high_freq_factor must exceed low_freq_factor")
        return self

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("extra")
        return d

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], name: str = "custom") -> ModelConfig:
        archs = d.get("architectures") or []
        model_type = d.get("model_type")
        if archs and not any(a in SUPPORTED_ARCHITECTURES for a in archs):
            raise ConfigError(f"unsupported architecture {archs}; supported: "
                              f"{', '.join(SUPPORTED_ARCHITECTURES)}")
        if not archs and model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(f"unsupported model_type {model_type!r}")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            # SwiGLU with silu is all the decoder implements; another activation would load
            # and run, silently computing a different function.
            raise ConfigError(f"hidden_act {act!r} is not supported (only silu)")
        try:
            heads = d["num_attention_heads"]
            hidden = d["hidden_size"]
            eos = d.get("eos_token_id", 2)
            eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
            # transformers < 5 writes rope_theta + rope_scaling; 5.x one rope_parameters map.
            rope = d.get("rope_parameters") or {}
            theta = d.get("rope_theta", rope.get("rope_theta", 10000.0))
            scaling = d.get("rope_scaling") or (rope if rope.get("rope_type") else None)
            if scaling is not None and scaling.get("rope_type", scaling.get("type")) == "default":
                scaling = None
            if scaling is not None:
                # rope_parameters also carries rope_theta; dropping it makes a 5.x config
                # equal the same model's 4.x config (theta has its own field).
                scaling = {k: v for k, v in scaling.items() if k != "rope_theta"}
            max_pos = d.get("max_position_embeddings", 4096)
            window = d.get("sliding_window")
            if isinstance(window, int) and isinstance(max_pos, int) and 0 < window < max_pos:
                # Mistral v0.1's sliding window is not implemented; up to the window's
                # length full causal attention is exactly the same function, so the
                # sequence length is capped there instead of silently diverging past it.
                max_pos = window
            cfg = cls(
                vocab_size=d["vocab_size"],
                hidden_size=hidden,
                intermediate_size=d["intermediate_size"],
                num_layers=d["num_hidden_layers"],
                num_heads=heads,
                num_kv_heads=d.get("num_key_value_heads") or heads,
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
                rope_theta=float(theta),
                rope_scaling=scaling,
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                max_position_embeddings=max_pos,
                bos_token_id=d.get("bos_token_id"),
                eos_token_ids=eos_ids,
                name=name,
            )
        except KeyError as e:
            raise ConfigError(f"config.json is missing the field {e.args[0]!r}") from None
        except (TypeError, AttributeError, ValueError) as e:
            raise ConfigError(f"config.json has a field of the wrong type: {e}") from None
        cfg.validate()
        # After validate(), so a non-integer head count is reported by name, not as a
        # TypeError from the division.
        head_dim = d.get("head_dim")
        if head_dim is not None and head_dim != cfg.head_dim:
            raise ConfigError(f"head_dim {head_dim!r} != hidden_size / num_attention_heads "
                              f"({cfg.head_dim}); only that head size is supported")
        return cfg

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"no config.json at {path}")
        return cls.from_hf_dict(read_json_object(path, "config.json"), name=path.parent.name)

    def to_hf_dict(self) -> dict[str, Any]:
        """The equivalent HF LlamaConfig fields (used by reference tests and peer benches)."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids),
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
        }


_LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
# Llama 3.2's config.json: the same schedule, stretched 32 times rather than 8.
_LLAMA32_SCALING = {**_LLAMA3_SCALING, "factor": 32.0}

# What every checkpoint of a family shares. Llama 2: vocabulary and 4K context. Llama 3.x:
# vocabulary, special ids, RoPE base and schedule, 128K context.
_LLAMA2: dict[str, Any] = dict(vocab_size=32000, max_position_embeddings=4096)
_LLAMA3: dict[str, Any] = dict(
    vocab_size=128256, bos_token_id=128000, eos_token_ids=(128001, 128008, 128009),
    rope_theta=500000.0, rope_scaling=_LLAMA3_SCALING, max_position_embeddings=131072)


def _member(family: dict[str, Any], name: str, **shape: Any) -> ModelConfig:
    """A preset of a family: the family's fields, with `shape` (the sizes, and any family
    field this checkpoint changes)."""
    return ModelConfig(**{**family, **shape}, name=name)


# Exact shapes of the public checkpoints; weights are random (no downloads at run time).
PRESETS: dict[str, ModelConfig] = {
    # CPU demos and tests. Vocab 3 + 256 is exactly the byte tokenizer (pad, bos, eos, bytes).
    "tiny": ModelConfig(vocab_size=259, hidden_size=64, intermediate_size=176, num_layers=2,
                        num_heads=4, num_kv_heads=2, max_position_embeddings=2048, name="tiny"),
    "llama-2-7b": _member(_LLAMA2, "llama-2-7b", hidden_size=4096, intermediate_size=11008,
                          num_layers=32, num_heads=32, num_kv_heads=32),
    "tinyllama-1.1b": ModelConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                                  num_layers=22, num_heads=32, num_kv_heads=4,
                                  max_position_embeddings=2048, name="tinyllama-1.1b"),
    "mistral-7b": ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                              num_layers=32, num_heads=32, num_kv_heads=8,
                              rope_theta=1e6, max_position_embeddings=32768,
                              name="mistral-7b"),
    "llama-3.1-8b": _member(_LLAMA3, "llama-3.1-8b", hidden_size=4096, intermediate_size=14336,
                            num_layers=32, num_heads=32, num_kv_heads=8),
    # Llama 3.2 1B: the published decode anchors (979.5 us/step on an H100) use this shape.
    "llama-3.2-1b": _member(_LLAMA3, "llama-3.2-1b", hidden_size=2048, intermediate_size=8192,
                            num_layers=16, num_heads=32, num_kv_heads=8,
                            rope_scaling=_LLAMA32_SCALING, tie_word_embeddings=True),
    # Tensor-parallel targets (hybridgraph/parallel): too big for one card in float16.
    "llama-2-13b": _member(_LLAMA2, "llama-2-13b", hidden_size=5120, intermediate_size=13824,
                           num_layers=40, num_heads=40, num_kv_heads=40),
    "llama-2-70b": _member(_LLAMA2, "llama-2-70b", hidden_size=8192, intermediate_size=28672,
                           num_layers=80, num_heads=64, num_kv_heads=8),
    "llama-3.1-70b": _member(_LLAMA3, "llama-3.1-70b", hidden_size=8192,
                             intermediate_size=28672, num_layers=80, num_heads=64,
                             num_kv_heads=8),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return replace(PRESETS[name], **overrides).validate()
