"""Build a Transformer from a preset (random weights), an embedded real model, a GGUF file
or a local HF model directory.

Weights go from safetensors (or GGUF) straight to the target device and dtype; nothing is
unpickled. Random weights are drawn on the target device, so a 7B preset takes seconds.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from hybridgraph.model.chat import ChatTemplateError, find_chat_template
from hybridgraph.model.config import PRESETS, ConfigError, ModelConfig, preset
from hybridgraph.model.embedded import EMBEDDED, EmbeddedModelMissing, embedded_path
from hybridgraph.model.generation import merge_eos, read_generation_config
from hybridgraph.model.gguf import checkpoint_dtype, gguf_config, is_gguf, load_gguf_weights
from hybridgraph.model.gguf_file import GGUFError, read_gguf
from hybridgraph.model.llama import Transformer
from hybridgraph.model.tokenizer import HFTokenizer, Tokenizer, TokenizerError, load_tokenizer


class LoadError(ValueError):
    """A model directory or checkpoint that cannot be loaded (message says which and why)."""


def empty_model(config: ModelConfig, device: torch.device, dtype: torch.dtype) -> Transformer:
    """A Transformer of `config` with uninitialized weights on `device` (nothing drawn)."""
    with torch.device("meta"):
        model = Transformer(config)
    model = model.to_empty(device=device).to(dtype)
    if config.tie_word_embeddings:  # to_empty breaks the tie; restore it
        model.output.weight = model.tok_embeddings.weight
    return model


def draw_random_(name: str, p: torch.Tensor, gen: torch.Generator) -> None:
    """The random weights of a preset: norms 1, the rest N(0, 0.02). One owner, so the
    ranks of parallel.load draw exactly the numbers random_model does."""
    if name.endswith("norm.weight"):
        p.fill_(1.0)
    else:
        p.normal_(0.0, 0.02, generator=gen)


def random_model(config: ModelConfig, device: torch.device, dtype: torch.dtype,
                 seed: int = 0) -> Transformer:
    model = empty_model(config, device, dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            draw_random_(name, p, gen)
    return model.eval()


def _hf_param_map(config: ModelConfig) -> dict[str, tuple[str, int, int]]:
    """HF tensor name -> (our parameter name, first row, rows) for fused weights."""
    d, nh, nkv = config.head_dim, config.num_heads, config.num_kv_heads
    inter = config.intermediate_size
    out: dict[str, tuple[str, int, int]] = {
        "model.embed_tokens.weight": ("tok_embeddings.weight", 0, config.vocab_size),
        "model.norm.weight": ("norm.weight", 0, config.hidden_size),
    }
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = ("output.weight", 0, config.vocab_size)
    for i in range(config.num_layers):
        hf, ours = f"model.layers.{i}.", f"layers.{i}."
        out[hf + "self_attn.q_proj.weight"] = (ours + "attention.wqkv.weight", 0, nh * d)
        out[hf + "self_attn.k_proj.weight"] = (ours + "attention.wqkv.weight", nh * d, nkv * d)
        out[hf + "self_attn.v_proj.weight"] = (ours + "attention.wqkv.weight", (nh + nkv) * d,
                                               nkv * d)
        out[hf + "self_attn.o_proj.weight"] = (ours + "attention.wo.weight", 0, config.hidden_size)
        out[hf + "mlp.gate_proj.weight"] = (ours + "feed_forward.w13.weight", 0, inter)
        out[hf + "mlp.up_proj.weight"] = (ours + "feed_forward.w13.weight", inter, inter)
        out[hf + "mlp.down_proj.weight"] = (ours + "feed_forward.w2.weight", 0, config.hidden_size)
        out[hf + "input_layernorm.weight"] = (ours + "attention_norm.weight", 0, config.hidden_size)
        out[hf + "post_attention_layernorm.weight"] = (ours + "ffn_norm.weight", 0,
                                                       config.hidden_size)
    return out


def _checkpoint_files(model_dir: Path) -> list[Path]:
    single = model_dir / "model.safetensors"
    index = model_dir / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise LoadError(f"malformed {index}: {e}") from None
        files = [model_dir / f for f in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise LoadError(f"{index.name} names {f.name}, which is missing from {model_dir}")
        return files
    raise LoadError(f"no model.safetensors or model.safetensors.index.json in {model_dir} "
                    "(only safetensors checkpoints are loaded; pickled .bin files never are)")


@dataclass(frozen=True)
class CheckpointTensor:
    """One checkpoint tensor, named and shape-checked but not yet read: it fills rows
    [row, row + rows) of the whole model's parameter `ours` (q/k/v and gate/up are fused)."""

    name: str
    ours: str
    row: int
    rows: int
    shape: tuple[int, ...]
    _file: Any  # the open safe_open handle: nothing is read until read() or part()

    def read(self) -> torch.Tensor:
        """The whole tensor."""
        return self._file.get_tensor(self.name)

    def part(self, index: tuple[slice, ...]) -> torch.Tensor:
        """Only `index` of the tensor (e.g. a rank's rows or columns): the rest never
        leaves the file."""
        return self._file.get_slice(self.name)[index]


def checkpoint_tensors(model_dir: Path, config: ModelConfig,
                       device: torch.device) -> Iterator[CheckpointTensor]:
    """The one walk over a checkpoint's tensors: rotary tables and a tied head skipped, each
    name checked against the HF -> ours map and each shape against the whole model of
    `config`, then none missing. Yields lazily: callers read all or part of each."""
    wanted = _hf_param_map(config)
    with torch.device("meta"):
        whole = {name: tuple(p.shape) for name, p in Transformer(config).named_parameters()}
    seen: set[str] = set()
    dev = str(device) if device.type != "cuda" or device.index is not None else "cuda:0"
    for file in _checkpoint_files(model_dir):
        with safe_open(str(file), framework="pt", device=dev) as f:
            for name in f.keys():
                if name.endswith("rotary_emb.inv_freq"):
                    continue
                if name == "lm_head.weight" and config.tie_word_embeddings:
                    continue
                if name not in wanted:
                    raise LoadError(f"{file.name}: unexpected tensor {name!r} "
                                    f"(not a {config.name} Llama-family weight)")
                ours, row, rows = wanted[name]
                shape = tuple(f.get_slice(name).get_shape())
                implied = (rows, *whole[ours][1:])
                if shape != implied:
                    raise LoadError(f"{file.name}: {name} has shape {shape}, "
                                    f"config.json implies {implied}")
                yield CheckpointTensor(name, ours, row, rows, shape, f)
                seen.add(name)
    missing = sorted(set(wanted) - seen)
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise LoadError(f"checkpoint in {model_dir} lacks {', '.join(missing[:3])}{more}")


# (our parameter, a checkpoint tensor) -> (the part of the parameter it fills, its values).
Placer = Callable[[torch.Tensor, CheckpointTensor], tuple[torch.Tensor, torch.Tensor]]


def _whole_rows(param: torch.Tensor, t: CheckpointTensor) -> tuple[torch.Tensor, torch.Tensor]:
    return param[t.row:t.row + t.rows], t.read()


def fill_from_checkpoint(model: Transformer, model_dir: Path, config: ModelConfig,
                         device: torch.device, dtype: torch.dtype,
                         place: Placer = _whole_rows) -> Transformer:
    """Fill an empty `model` from the checkpoint of the whole model `config`; `place` picks
    what of each tensor goes where (default: all of it into its rows; parallel.load: one
    rank's slice)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for t in checkpoint_tensors(model_dir, config, device):
            target, values = place(params[t.ours], t)
            target.copy_(values.to(dtype))
    return model.eval()


def load_checkpoint(model_dir: Path, config: ModelConfig, device: torch.device,
                    dtype: torch.dtype) -> Transformer:
    return fill_from_checkpoint(empty_model(config, device, dtype), model_dir, config,
                                device, dtype)


# ---- hybridgraph issue 11: GGUF files, embedded models, tokenizers refused, not faked ----

MODEL_CHOICES = (*EMBEDDED, *PRESETS)


def resolve_source(source: str) -> Path | None:
    """A source's path on disk: the embedded model's file, or the given path; None for a
    preset with random weights."""
    if source in PRESETS:
        return None
    if source in EMBEDDED:
        try:
            return embedded_path(source)
        except EmbeddedModelMissing as e:
            raise LoadError(str(e)) from None
    path = Path(source)
    if not path.exists():
        raise LoadError(f"{source!r} is neither a model name ({', '.join(MODEL_CHOICES)}), "
                        "a GGUF file nor a model directory")
    return path


_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16,
                 "bfloat16": torch.bfloat16}


def stored_dtype(source: str) -> torch.dtype | None:
    """The dtype a checkpoint's weights are stored in (config.json's torch_dtype, a GGUF's
    file type); None for random presets and quantized files."""
    path = resolve_source(source)
    if path is None:
        return None
    if path.is_file():
        try:
            return checkpoint_dtype(read_gguf(path))
        except GGUFError as e:
            raise LoadError(str(e)) from None
    try:
        d = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None  # load_model reports the config properly
    name = d.get("torch_dtype", d.get("dtype")) if isinstance(d, dict) else None
    return _TORCH_DTYPES.get(name) if isinstance(name, str) else None


def auto_dtype(source: str, device: torch.device | str) -> torch.dtype:
    """dtype=auto: float32 on a CPU (no fast half-precision matmuls there); on CUDA the
    checkpoint's own dtype (bfloat16 only where the GPU has it), float16 when it has none."""
    device = torch.device(device)
    if device.type != "cuda":
        return torch.float32
    stored = stored_dtype(source)
    if stored == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        return torch.float16
    return stored if stored is not None else torch.float16


def _load_gguf(path: Path, device: torch.device, dtype: torch.dtype,
               chat_override: str | None) -> tuple[Transformer, HFTokenizer]:
    from hybridgraph.model.gguf_tokenizer import gguf_tokenizer

    g = read_gguf(path)
    config = gguf_config(g)
    tok, info = gguf_tokenizer(g)
    template = find_chat_template(None, g.get("tokenizer.chat_template"), chat_override)
    model = load_gguf_weights(g, empty_model(config, device, dtype), dtype)
    return model, HFTokenizer(tok, config.bos_token_id, config.eos_token_ids, template,
                              info["bos_token"], info["eos_token"])


def load_model(source: str, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32, seed: int = 0,
               tokenizer: str | None = None, chat_template: str | None = None,
               ) -> tuple[Transformer, Tokenizer]:
    """A preset name (random weights), an embedded model's name, a GGUF file or a local HF
    directory -> (model, tokenizer). `tokenizer`: a tokenizer.json to use instead of the
    model's own; `chat_template`: a template (file or text) overriding the model's."""
    device = torch.device(device)
    path = resolve_source(source)
    try:
        if path is None:
            config = preset(source)
            model = random_model(config, device, dtype, seed)
            return model, preset_tokenizer(config, tokenizer, chat_template)
        if path.is_file():
            if not is_gguf(path):
                raise LoadError(f"{path} is not a GGUF file (no GGUF magic bytes) and not a "
                                "model directory")
            model, tok = _load_gguf(path, device, dtype, chat_template)
            if tokenizer is not None:
                tok = load_tokenizer(None, tok.bos_id, tok.eos_ids, tokenizer, tok.chat_template)
            return model, tok
        config, tok = directory_config(path, tokenizer, chat_template)
    except (ConfigError, GGUFError, TokenizerError, ChatTemplateError) as e:
        raise LoadError(str(e)) from None
    return load_checkpoint(path, config, device, dtype), tok


def preset_tokenizer(config: ModelConfig, tokenizer: str | None = None,
                     chat_template: str | None = None) -> Tokenizer:
    """A random preset's tokenizer: bytes, or the given tokenizer.json."""
    template = find_chat_template(None, None, chat_template)
    if tokenizer is None:
        tok: Tokenizer = load_tokenizer(None, config.bos_token_id, config.eos_token_ids)
        tok.chat_template = template
        return tok
    return load_tokenizer(None, config.bos_token_id, config.eos_token_ids, tokenizer, template)


def directory_config(path: Path, tokenizer: str | None = None,
                     chat_template: str | None = None) -> tuple[ModelConfig, Tokenizer]:
    """An HF directory's config (end ids merged with generation_config.json's) and its
    tokenizer, without its weights (tensor-parallel ranks load their own slices)."""
    config = ModelConfig.from_json(path / "config.json")
    gen = read_generation_config(path)
    config = replace(config, eos_token_ids=merge_eos(config.eos_token_ids, gen.eos_token_ids))
    config.extra["generation"] = gen
    template = find_chat_template(path, None, chat_template)
    return config, load_tokenizer(path, config.bos_token_id, config.eos_token_ids, tokenizer,
                                  template)
