"""A rank's engine: its share of the weights, the all-reduce hook, leader or follower.

`load_engine` is what the front (CLI generate and serve, bench) calls on rank 0 in place
of `Engine.load`; `follow_main` is what every other rank runs instead of the front.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from hybridgraph.engine import DTYPES, Engine
from hybridgraph.engine_config import EngineConfig
from hybridgraph.model.llama import Transformer
from hybridgraph.model.loader import auto_dtype
from hybridgraph.model.tokenizer import Tokenizer
from hybridgraph.parallel.control import follow, lead
from hybridgraph.parallel.group import TPGroup, check_tp, init_group
from hybridgraph.parallel.load import load_shard, model_config


def shard_model(model: str, group: TPGroup, dtype: torch.dtype, seed: int = 0,
                tokenizer: str | None = None, chat_template: str | None = None,
                allreduce: str = "auto", max_batch: int = 1,
                ) -> tuple[Transformer, Tokenizer]:
    """This rank's share of `model`, its blocks summing their partial outputs over the group
    with the all-reduce `allreduce` picks (EngineConfig.allreduce; group.allreduce says
    which runs and why; a symmetric buffer for decode batches of up to `max_batch` rows)."""
    shard, tok = load_shard(model, group.size, group.rank, group.device, dtype, seed,
                            tokenizer, chat_template)
    group.use_allreduce(allreduce, shard.config.hidden_size, max_batch, [dtype])
    # One callable object for every layer: the compiled block's guards see the same one.
    reduce, reduce_add = group.all_reduce, group.all_reduce_add
    for layer in shard.layers:
        layer.all_reduce, layer.reduce_add = reduce, reduce_add
    return shard, tok


def build_rank(model: str, config: EngineConfig) -> tuple[Engine, TPGroup]:
    """This process's rank: join the group, load its shard, build its engine (rank 0's
    leads: parallel/control.py)."""
    device_type = "cuda" if config.device.startswith("cuda") or (
        config.device == "auto" and torch.cuda.is_available()) else "cpu"
    check_tp(config.tp, model_config(model), device_type)
    group = init_group(config.tp, config.device)
    # dtype auto as Engine.load resolves it: the checkpoint's own on CUDA, float32 on a CPU.
    dtype = (auto_dtype(model, group.device) if config.dtype == "auto"
             else DTYPES[config.dtype])
    config.start_kernel_check(group.device, dtype)
    shard, tokenizer = shard_model(model, group, dtype, config.weights_seed, config.tokenizer,
                                   config.chat_template, config.allreduce, config.max_batch)
    engine = Engine(shard, tokenizer, replace(config, device=str(group.device),
                                              dtype=str(dtype).removeprefix("torch.")))
    engine.allreduce, engine.allreduce_reason = group.allreduce, group.allreduce_reason
    if group.leader:
        lead(engine, group)
    return engine, group


def load_engine(model: str, config: EngineConfig) -> Engine:
    """Engine.load for tp 1; for tp > 1, rank 0's engine (the other ranks: follow_main)."""
    if config.tp == 1:
        return Engine.load(model, config=config)
    engine, group = build_rank(model, config)
    if not group.leader:
        raise RuntimeError(f"load_engine on rank {group.rank}: only rank 0 runs the front; "
                           "the other ranks run follow_main")
    return engine


def follow_main(model: str, config: EngineConfig) -> int:
    """A follower rank's whole life: build, run rank 0's steps until it stops, exit 0."""
    engine, group = build_rank(model, config)
    follow(engine, group)
    group.close()
    return 0
