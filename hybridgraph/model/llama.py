"""A Llama-family decoder (RMSNorm, RoPE, GQA, SwiGLU) written for CUDA-graph capture.

Every shape inside `prefill` and `decode` is fixed by the arguments' shapes and two
Python ints chosen by the caller (the bucket sizes); positions and lengths are device
tensors. No `.item()`, no data-dependent branches: one captured graph serves every
position of every request.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hybridgraph.model.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in float32, as HF does, so fp16 activations don't overflow.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


# Positions allocated past max_seq in the KV cache and the RoPE tables, never used: a
# prefill or a decode window of max_seq positions then never spans a whole dimension. A slice
# that did would make torch.compile guard on that length (a contiguity check) and compile
# the blocks a second time at start-up. 16, not 1: the sequence dimension keeps the
# divisibility by 16 that Triton specialises the kernels' cache strides on.
SPARE_POSITIONS = 16


class KVCache(nn.Module):
    """Keys and values of one layer, allocated once: [max_batch, kv_heads, max_seq +
    SPARE_POSITIONS, head_dim].

    Batch row b of a decode step uses cache row b. A prefill may name its cache rows with
    a device tensor instead, so one captured prefill graph serves a prompt bound for any
    row (the batching scheduler places newcomers in whichever row is free).
    """

    def __init__(self, max_batch: int, max_seq: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        shape = (max_batch, kv_heads, max_seq + SPARE_POSITIONS, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def write_prefix(self, k: Tensor, v: Tensor) -> None:
        """k, v: [B, kv_heads, T, D] for positions 0..T-1 of rows 0..B-1."""
        b, _, t, _ = k.shape
        self.k[:b, :, :t].copy_(k)
        self.v[:b, :, :t].copy_(v)

    def write_rows(self, rows: Tensor, k: Tensor, v: Tensor) -> None:
        """k, v: [B, kv_heads, T, D] for positions 0..T-1 of cache rows rows[0..B-1]
        (distinct rows: a repeated row would leave which write wins undefined)."""
        t = k.shape[2]
        self.k[rows, :, :t] = k
        self.v[rows, :, :t] = v

    def write_at(self, pos: Tensor, k: Tensor, v: Tensor) -> None:
        """k, v: [B, kv_heads, D] written at position pos[b] of row b."""
        rows = torch.arange(k.shape[0], device=k.device)
        self.k[rows, :, pos] = k
        self.v[rows, :, pos] = v


def rope_inv_freq(config: ModelConfig) -> Tensor:
    d = config.head_dim
    # float32 like the reference implementation, so float32 runs agree to rounding.
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    s = config.rope_scaling
    if s is None or s.get("rope_type", s.get("type")) == "default":
        return inv_freq
    # llama3: long wavelengths are slowed by `factor`, short ones kept, a smooth ramp between.
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    ramp = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, ramp, scaled)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        # q, k and v in one matmul: one weight read, one launch.
        self.wqkv = nn.Linear(config.hidden_size, (self.n_heads + 2 * self.n_kv) * self.head_dim,
                              bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, config.hidden_size, bias=False)
        self.scale = 1.0 / math.sqrt(self.head_dim)

    def _qkv(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, t, _ = x.shape
        q, k, v = self.wqkv(x).split(
            [self.n_heads * self.head_dim, self.n_kv * self.head_dim, self.n_kv * self.head_dim],
            dim=-1)
        q = q.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # broadcast over heads
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def prefill(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache,
                rows: Tensor | None = None) -> Tensor:
        """Prompts start at position 0, right-padded: causal masking alone keeps every real
        token from seeing padding, so attention runs over the new keys only (flash-able).
        It never reads the cache, so whatever a row held before is never seen."""
        b, t, _ = x.shape
        q, k, v = self._qkv(x, cos, sin)
        if rows is None:
            cache.write_prefix(k, v)
        else:
            cache.write_rows(rows, k, v)
        rep = self.n_heads // self.n_kv
        if rep > 1:
            k = k[:, :, None].expand(b, self.n_kv, rep, t, self.head_dim).reshape(b, -1, t, self.head_dim)
            v = v[:, :, None].expand(b, self.n_kv, rep, t, self.head_dim).reshape(b, -1, t, self.head_dim)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(out.transpose(1, 2).reshape(b, t, -1))

    def decode(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache, pos: Tensor,
               window: int) -> Tensor:
        """One new token per row at position pos[b]; attends over cache[:, :, :window].
        Rows are independent: row b reads and writes cache row b only, so a row the caller
        masks out (its position held still, its output ignored) disturbs no other."""
        b = x.shape[0]
        q, k, v = self._qkv(x, cos, sin)
        cache.write_at(pos, k[:, :, 0], v[:, :, 0])
        rep = self.n_heads // self.n_kv
        # Group the query heads of each kv head so keys and values are read once (no repeat).
        q = q.view(b, self.n_kv, rep, self.head_dim)
        keys, values = cache.k[:b, :, :window], cache.v[:b, :, :window]
        scores = torch.matmul(q, keys.transpose(-1, -2)).float() * self.scale  # [b, kv, rep, W]
        visible = torch.arange(window, device=x.device)[None, :] <= pos[:, None]
        scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(values.dtype)
        out = torch.matmul(probs, values)  # [b, kv, rep, D]
        return self.wo(out.reshape(b, 1, -1))


class FeedForward(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.w13 = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.w2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


def no_reduce(x: Tensor) -> Tensor:
    return x


class Block(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attention = Attention(config)
        self.feed_forward = FeedForward(config)
        self.attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # Under tensor parallelism (hybridgraph/parallel) attention and feed-forward each
        # return one rank's partial sum, and this sums it over ranks. One rank: identity,
        # which torch.compile traces away and eager pays one Python call for.
        self.all_reduce: Callable[[Tensor], Tensor] = no_reduce
        # residual + all_reduce(part) in one call, where the all-reduce can fuse the add
        # (the one-shot kernel: parallel/symm.py); set beside all_reduce. The default
        # reduces, then adds (TritonDecode._reduced_tail calls it either way).
        self.reduce_add: Callable[[Tensor, Tensor], Tensor] = self.reduce_then_add

    def reduce_then_add(self, part: Tensor, residual: Tensor) -> Tensor:
        """reduce_add's default: residual + all_reduce(part). The hook may sum in place
        (NCCL) or return a new tensor: its result is used."""
        return residual + self.all_reduce(part)

    def prefill(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache,
                rows: Tensor | None = None) -> Tensor:
        x = x + self.all_reduce(self.attention.prefill(self.attention_norm(x), cos, sin, cache,
                                                       rows))
        return x + self.all_reduce(self.feed_forward(self.ffn_norm(x)))

    def decode(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache, pos: Tensor,
               window: int) -> Tensor:
        x = x + self.all_reduce(
            self.attention.decode(self.attention_norm(x), cos, sin, cache, pos, window))
        return x + self.all_reduce(self.feed_forward(self.ffn_norm(x)))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.output = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.caches = nn.ModuleList()
        self.max_batch = 0
        self.max_seq = 0

    def setup_caches(self, max_batch: int, max_seq: int) -> None:
        """Allocate the KV cache and RoPE tables once; called again only to resize."""
        p = self.tok_embeddings.weight
        cfg = self.config
        self.caches = nn.ModuleList(
            KVCache(max_batch, max_seq, cfg.num_kv_heads, cfg.head_dim, p.dtype, p.device)
            for _ in range(cfg.num_layers))
        positions = torch.arange(max_seq + SPARE_POSITIONS, dtype=torch.float32, device=p.device)
        freqs = torch.outer(positions, rope_inv_freq(cfg).to(p.device))
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("rope_cos", emb.cos().to(p.dtype), persistent=False)
        self.register_buffer("rope_sin", emb.sin().to(p.dtype), persistent=False)
        self.max_batch, self.max_seq = max_batch, max_seq

    def prefill(self, ids: Tensor, last_idx: Tensor | None = None,
                block: Callable[..., Tensor] = Block.prefill, rows: Tensor | None = None,
                ) -> Tensor:
        """ids: [B, T] right-padded prompts written to cache rows 0..B-1 (or rows[0..B-1]
        when `rows`, a device tensor, is given), positions 0..T-1.

        Returns float32 logits of the token at last_idx[b] of each row ([B, V]), or of
        every position ([B, T, V]) when last_idx is None. `block` runs one layer (the
        runtime passes a compiled Block.prefill: every layer shares one compilation).
        """
        t = ids.shape[1]
        cos, sin = self.rope_cos[None, :t], self.rope_sin[None, :t]
        x = self.tok_embeddings(ids)
        for layer, cache in zip(self.layers, self.caches, strict=True):
            x = block(layer, x, cos, sin, cache, rows)
        if last_idx is not None:
            x = x[torch.arange(x.shape[0], device=x.device), last_idx]
        return self.output(self.norm(x)).float()

    def decode(self, ids: Tensor, pos: Tensor, window: int,
               block: Callable[..., Tensor] = Block.decode) -> Tensor:
        """ids, pos: [B]; token ids[b] sits at position pos[b] of row b. The keys seen are
        cache[:, :, :window], so window must exceed every pos. Returns [B, V] float32."""
        cos, sin = self.rope_cos[pos][:, None], self.rope_sin[pos][:, None]
        x = self.tok_embeddings(ids)[:, None]
        for layer, cache in zip(self.layers, self.caches, strict=True):
            x = block(layer, x, cos, sin, cache, pos, window)
        return self.output(self.norm(x[:, 0])).float()
