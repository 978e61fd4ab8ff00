"""The default KV cache length: the model's context limit, unless memory says otherwise."""

from __future__ import annotations

import logging

import torch

from hybridgraph.model.config import ModelConfig
from hybridgraph.model.llama import SPARE_POSITIONS

log = logging.getLogger(__name__)

# Share of the free memory the KV cache may take by default; the rest is for activations,
# graphs and whatever else shares the device.
KV_MEMORY_SHARE = 0.5


def kv_bytes_per_position(config: ModelConfig, max_batch: int, dtype: torch.dtype) -> int:
    size = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_layers * max_batch * config.num_kv_heads * config.head_dim * size


def free_memory(device: torch.device) -> int | None:
    """Bytes free on the device now; None when unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def default_max_seq_len(config: ModelConfig, max_batch: int, dtype: torch.dtype,
                        device: torch.device) -> int:
    """The model's context limit, capped so the cache takes at most KV_MEMORY_SHARE of the
    free memory (a power of two, so graph windows stay aligned); says so when it caps."""
    limit = config.max_position_embeddings
    free = free_memory(device)
    if free is None:
        return limit
    per_pos = kv_bytes_per_position(config, max_batch, dtype)
    fits = int(free * KV_MEMORY_SHARE) // per_pos - SPARE_POSITIONS  # allocated past the length
    if fits >= limit:
        return limit
    capped = max(2, 1 << (max(fits, 2).bit_length() - 1))
    log.warning("KV cache: %s allows %d tokens, but %.1f GiB free on %s holds %d; using "
                "max_seq_len %d (pass --max-seq-len to choose)", config.name, limit,
                free / 2**30, device, fits, capped)
    return capped
