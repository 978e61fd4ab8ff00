"""Megatron-style sharding of a Llama decoder: which slice of every weight a rank holds.

QKV and gate/up are split by output rows (whole heads per rank, query and KV heads alike,
so a rank's query heads see exactly their own KV heads under GQA), O and down by input
columns; each rank's attention and feed-forward then produce a partial sum that one
all-reduce per sub-layer completes. The embedding, the norms and the LM head are
replicated (not vocabulary-sharded): every rank computes the same logits and samples the
same token, so no gather is needed after the head.

A rank's model is an ordinary Transformer built from its `ShardedConfig` (num_heads,
num_kv_heads and intermediate_size per rank), so its KV cache holds only its KV heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from hybridgraph.model.config import ModelConfig
from hybridgraph.model.loader import _hf_param_map

# Our parameter (the part after "layers.{i}.") -> the dimension it is split along.
SPLIT_DIM = {
    "attention.wqkv.weight": 0,     # output rows: q heads, then k heads, then v heads
    "feed_forward.w13.weight": 0,   # output rows: gate, then up
    "attention.wo.weight": 1,       # input columns: the heads' outputs
    "feed_forward.w2.weight": 1,    # input columns: the feed-forward width
}


@dataclass(frozen=True)
class ShardedConfig(ModelConfig):
    """One rank's share of a model: num_heads, num_kv_heads and intermediate_size count
    this rank's heads and width; hidden_size, vocabulary and head_dim are the model's."""

    tp_size: int = 1
    tp_rank: int = 0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // (self.num_heads * self.tp_size)

    def num_params(self) -> int:
        """Parameters this rank holds (the replicated ones included)."""
        h, i, v, d = self.hidden_size, self.intermediate_size, self.vocab_size, self.head_dim
        q, kv = self.num_heads * d, self.num_kv_heads * d
        per_layer = h * (q + 2 * kv) + q * h + 3 * h * i + 2 * h
        head = 0 if self.tie_word_embeddings else v * h
        return v * h + self.num_layers * per_layer + h + head


def shard_config(config: ModelConfig, tp: int, rank: int) -> ShardedConfig:
    """Rank `rank` of `tp`'s config (tp must divide the counts: parallel.group.check_tp)."""
    fields = {k: getattr(config, k) for k in config.__dataclass_fields__}
    fields.update(num_heads=config.num_heads // tp, num_kv_heads=config.num_kv_heads // tp,
                  intermediate_size=config.intermediate_size // tp, tp_size=tp, tp_rank=rank)
    return ShardedConfig(**fields).validate()  # type: ignore[return-value]


def full_config(config: ModelConfig) -> ModelConfig:
    """The whole model's config back from a rank's (identity on an unsharded one)."""
    if not isinstance(config, ShardedConfig):
        return config
    n = config.tp_size
    fields = {k: getattr(config, k) for k in ModelConfig.__dataclass_fields__}
    fields.update(num_heads=config.num_heads * n, num_kv_heads=config.num_kv_heads * n,
                  intermediate_size=config.intermediate_size * n)
    return ModelConfig(**fields)


def split_dim(name: str) -> int | None:
    """The dimension our parameter `name` is split along; None: replicated."""
    return SPLIT_DIM.get(name.split(".", 2)[-1]) if name.startswith("layers.") else None


def row_parts(config: ModelConfig) -> dict[str, list[tuple[int, int]]]:
    """Fused parameter -> its (first row, rows) parts, from the checkpoint name map (the
    one owner of how q/k/v and gate/up are fused). Each part is split evenly over ranks."""
    parts: dict[str, list[tuple[int, int]]] = {}
    for ours, row, rows in _hf_param_map(config).values():
        if split_dim(ours) == 0:
            parts.setdefault(ours, []).append((row, rows))
    return {k: sorted(v) for k, v in parts.items()}


def shard_tensor(name: str, full: Tensor, tp: int, rank: int,
                 parts: dict[str, list[tuple[int, int]]]) -> Tensor:
    """Rank `rank`'s slice of the whole-model parameter `name` (a view where it can be)."""
    dim = split_dim(name)
    if dim is None:
        return full
    if dim == 1:
        step = full.shape[1] // tp
        return full[:, rank * step:(rank + 1) * step]
    pieces = []
    for row, rows in parts[name]:
        step = rows // tp
        pieces.append(full[row + rank * step:row + (rank + 1) * step])
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0)
