"""Per-rank loading: each rank reads only its own slices, never the whole model.

From safetensors each split tensor is read with `get_slice` (only this rank's rows or
columns leave the file); replicated tensors are read whole. The walk over the checkpoint
(names, shapes, fusing, nothing missing) is model.loader's; this module only says which
slice of each tensor is this rank's (`rank_placer`). A random preset draws each
whole-model parameter in turn with the same generator, in the same order and dtype as
`model.loader.random_model`, and keeps this rank's slice: the ranks together hold
exactly the single-rank model's weights, one parameter in memory at a time.
"""

from __future__ import annotations

from pathlib import Path

import torch

from hybridgraph.model.chat import ChatTemplateError
from hybridgraph.model.config import ConfigError, ModelConfig, preset
from hybridgraph.model.llama import Transformer
from hybridgraph.model.loader import (
    CheckpointTensor,
    LoadError,
    Placer,
    directory_config,
    draw_random_,
    empty_model,
    fill_from_checkpoint,
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
    local = empty_model(shard_config(config, tp, rank), device, dtype)
    params = dict(local.named_parameters())
    parts = row_parts(config)
    with torch.device("meta"):
        whole = Transformer(config)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in whole.named_parameters():
            full = torch.empty(p.shape, device=device, dtype=dtype)
            draw_random_(name, full, gen)
            params[name].copy_(shard_tensor(name, full, tp, rank, parts))
            del full
    return local.eval()


def rank_placer(tp: int, rank: int) -> Placer:
    """Where a checkpoint tensor's share for rank `rank` of `tp` goes, and only that share
    read from the file: rows (q/k/v, gate/up: each fused part split evenly, so a part's
    rows sit at row/tp in the rank's parameter) or columns (o, down); replicated whole."""
    def place(param: torch.Tensor, t: CheckpointTensor) -> tuple[torch.Tensor, torch.Tensor]:
        dim = split_dim(t.ours)
        if dim is None:
            return param[t.row:t.row + t.rows], t.read()
        step = t.shape[dim] // tp
        mine = slice(rank * step, (rank + 1) * step)
        if dim == 1:
            return param, t.part((slice(None), mine))
        return param[t.row // tp:t.row // tp + step], t.part((mine,))
    return place


def checkpoint_shard(model_dir: Path, config: ModelConfig, tp: int, rank: int,
                     device: torch.device, dtype: torch.dtype) -> Transformer:
    local = empty_model(shard_config(config, tp, rank), device, dtype)
    return fill_from_checkpoint(local, model_dir, config, device, dtype,
                                rank_placer(tp, rank))


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
           "rank_placer", "rank_weight_bytes"]
