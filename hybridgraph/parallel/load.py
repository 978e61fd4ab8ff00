"""Per-rank loading: each rank reads only its own slices, never the whole model.

From safetensors each split tensor is read with `get_slice` (only this rank's rows or
columns leave the file); replicated tensors are read whole. A random preset draws each
whole-model parameter in turn with the same generator, in the same order and dtype as
`model.loader.random_model`, and keeps this rank's slice: the ranks together hold
exactly the single-rank model's weights, one parameter in memory at a time.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from hybridgraph.model.chat import ChatTemplateError
from hybridgraph.model.config import ConfigError, ModelConfig, preset
from hybridgraph.model.llama import Transformer
from hybridgraph.model.loader import (
    LoadError,
    _checkpoint_files,
    _empty_model,
    _hf_param_map,
    directory_config,
    preset_tokenizer,
    resolve_source,
)
from hybridgraph.model.tokenizer import Tokenizer, TokenizerError
from hybridgraph.parallel.shard import row_parts, shard_config, shard_tensor, split_dim


def _directory(source: str) -> Path | None:
    """The checkpoint directory of `source`; None for a random preset. Other sources (a
    GGUF file, the embedded model) are refused: ranks read their slices from safetensors."""
    path = resolve_source(source)
    if path is not None and not path.is_dir():
        raise LoadError(f"{source!r}: tensor parallelism loads presets and safetensors "
                        "directories (each rank reads its slices); not GGUF files yet")
    return path


def model_config(source: str) -> ModelConfig:
    """The whole model's config: a preset, or a directory's config.json."""
    path = _directory(source)
    try:
        return preset(source) if path is None else ModelConfig.from_json(path / "config.json")
    except ConfigError as e:
        raise LoadError(str(e)) from None


def random_shard(config: ModelConfig, tp: int, rank: int, device: torch.device,
                 dtype: torch.dtype, seed: int = 0) -> Transformer:
    local = _empty_model(shard_config(config, tp, rank), device, dtype)
    params = dict(local.named_parameters())
    parts = row_parts(config)
    with torch.device("meta"):
        whole = Transformer(config)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in whole.named_parameters():
            full = torch.empty(p.shape, device=device, dtype=dtype)
            if name.endswith("norm.weight"):
                full.fill_(1.0)
            else:
                full.normal_(0.0, 0.02, generator=gen)
            params[name].copy_(shard_tensor(name, full, tp, rank, parts))
            del full
    return local.eval()


def checkpoint_shard(model_dir: Path, config: ModelConfig, tp: int, rank: int,
                     device: torch.device, dtype: torch.dtype) -> Transformer:
    local = _empty_model(shard_config(config, tp, rank), device, dtype)
    params = dict(local.named_parameters())
    wanted = _hf_param_map(config)
    seen: set[str] = set()
    dev = str(device)
    with torch.no_grad():
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
                    sl = f.get_slice(name)
                    whole, target = _expected(params[ours], split_dim(ours), row, rows, tp)
                    if tuple(sl.get_shape()) != whole:
                        raise LoadError(f"{file.name}: {name} has shape "
                                        f"{tuple(sl.get_shape())}, config.json implies {whole}")
                    tensor = _read_rank_slice(sl, split_dim(ours), tp, rank)
                    target.copy_(tensor.to(dtype))
                    seen.add(name)
    missing = sorted(set(wanted) - seen)
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise LoadError(f"checkpoint in {model_dir} lacks {', '.join(missing[:3])}{more}")
    return local.eval()


def _expected(param: torch.Tensor, dim: int | None, row: int, rows: int, tp: int,
              ) -> tuple[tuple[int, ...], torch.Tensor]:
    """(the checkpoint tensor's whole shape, the part of our parameter its slice fills)."""
    if dim is None:
        target = param[row:row + rows]
        return tuple(target.shape), target
    if dim == 1:
        return (param.shape[0], param.shape[1] * tp), param
    # A part's rows sit at row/tp in the rank's fused parameter: every part is split evenly.
    step = rows // tp
    return (rows, *param.shape[1:]), param[row // tp:row // tp + step]


def _read_rank_slice(sl, dim: int | None, tp: int, rank: int) -> torch.Tensor:
    """Only this rank's rows (dim 0) or columns (dim 1) of a checkpoint tensor."""
    if dim is None:
        return sl[:]
    step = sl.get_shape()[dim] // tp
    if dim == 1:
        return sl[:, rank * step:(rank + 1) * step]
    return sl[rank * step:(rank + 1) * step]


def load_shard(source: str, tp: int, rank: int, device: torch.device, dtype: torch.dtype,
               seed: int = 0, tokenizer: str | None = None, chat_template: str | None = None,
               ) -> tuple[Transformer, Tokenizer]:
    """Rank `rank` of `tp`'s model (preset: random weights; directory: its checkpoint),
    with the tokenizer `model.loader.load_model` would give the whole model."""
    path = _directory(source)
    try:
        if path is None:
            config = preset(source)
            tok = preset_tokenizer(config, tokenizer, chat_template)
            return random_shard(config, tp, rank, device, dtype, seed), tok
        config, tok = directory_config(path, tokenizer, chat_template)
    except (ConfigError, TokenizerError, ChatTemplateError) as e:
        raise LoadError(str(e)) from None
    return checkpoint_shard(path, config, tp, rank, device, dtype), tok


def rank_weight_bytes(model: Transformer) -> int:
    """Bytes of weights this rank holds (tied weights once)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


__all__ = ["checkpoint_shard", "load_shard", "model_config", "random_shard",
           "rank_weight_bytes"]
