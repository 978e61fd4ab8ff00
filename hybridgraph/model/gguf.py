"""GGUF files (llama.cpp's format): metadata -> ModelConfig, tensors -> our Transformer.

Read with the `gguf` package (memory-mapped, nothing unpickled); quantized tensors are
dequantized by that package to float32 and cast to the chosen dtype. llama.cpp's converter
permutes the rows of attn_q / attn_k (interleaved RoPE pairs); that permutation is undone
here so the weights match the HF layout our decoder uses (rotate-half RoPE).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hybridgraph.model.config import ConfigError, ModelConfig
from hybridgraph.model.gguf_file import GGUF_MAGIC, GGUFError, GGUFFile, GGUFTensor
from hybridgraph.model.llama import Transformer, rope_inv_freq

SUPPORTED_ARCHITECTURES = ("llama",)  # Mistral and Llama-3 GGUFs use "llama" too
# Types whose dequantization the gguf package implements and we have checked.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
                   "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
# general.file_type -> the checkpoint's own float dtype (None: quantized, no natural dtype).
_FILE_TYPE_DTYPE = {0: torch.float32, 1: torch.float16, 32: torch.bfloat16}
# Llama 3.1's RoPE schedule: the only frequency table (rope_freqs) we accept.
_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def is_gguf(path: str | Path) -> bool:
    p = Path(path)
    if not p.is_file():
        return False
    with open(p, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def gguf_config(g: GGUFFile) -> ModelConfig:
    """The ModelConfig that a llama-architecture GGUF's metadata describes."""
    arch = g.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFError(f"{g.path.name}: unsupported architecture {arch!r} "
                        f"(general.architecture); supported: {', '.join(SUPPORTED_ARCHITECTURES)}")

    def need(key: str) -> Any:
        v = g.get(f"{arch}.{key}")
        if v is None:
            raise GGUFError(f"{g.path.name}: metadata lacks {arch}.{key}")
        if isinstance(v, list):
            raise GGUFError(f"{g.path.name}: {arch}.{key} varies per layer; not supported")
        return v

    scaling_type = g.get(f"{arch}.rope.scaling.type")
    if scaling_type not in (None, "none"):
        raise GGUFError(f"{g.path.name}: RoPE scaling {scaling_type!r} ({arch}.rope.scaling.type) "
                        "is not supported")
    heads = need("attention.head_count")
    tokens = g.get("tokenizer.ggml.tokens")
    vocab = g.get(f"{arch}.vocab_size") or (len(tokens) if tokens else None)
    if vocab is None:
        raise GGUFError(f"{g.path.name}: neither {arch}.vocab_size nor a token list")
    eos = [g.get(k) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                              "tokenizer.ggml.eom_token_id")]
    try:
        cfg = ModelConfig(
            vocab_size=int(vocab),
            hidden_size=need("embedding_length"),
            intermediate_size=need("feed_forward_length"),
            num_layers=need("block_count"),
            num_heads=heads,
            num_kv_heads=g.get(f"{arch}.attention.head_count_kv") or heads,
            rms_norm_eps=float(g.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(g.get(f"{arch}.rope.freq_base", 10000.0)),
            tie_word_embeddings=g.tensor("output.weight") is None,
            max_position_embeddings=need("context_length"),
            bos_token_id=g.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=tuple(dict.fromkeys(e for e in eos if e is not None)),
            name=Path(g.path).stem,
        ).validate()
    except ConfigError as e:
        raise GGUFError(f"{g.path.name}: {e}") from None
    for key in ("rope.dimension_count", "attention.key_length"):
        v = g.get(f"{arch}.{key}")
        if v is not None and v != cfg.head_dim:
            raise GGUFError(f"{g.path.name}: {arch}.{key} = {v} differs from the head size "
                            f"{cfg.head_dim}; not supported")
    if g.tensor("rope_freqs.weight") is not None:
        cfg = _with_rope_freqs(g, cfg)
    return cfg


def _with_rope_freqs(g: GGUFFile, cfg: ModelConfig) -> ModelConfig:
    """llama.cpp stores Llama 3.1's RoPE schedule as a table of frequency divisors; accept it
    when it is exactly that schedule, refuse any other table rather than ignore it."""
    from dataclasses import replace

    t = g.tensor("rope_freqs.weight")
    if t.type_name != "F32":
        raise GGUFError(f"{g.path.name}: rope_freqs.weight is {t.type_name}, expected F32")
    table = torch.from_numpy(t.raw().view(np.float32).copy())
    want = replace(cfg, rope_scaling=dict(_LLAMA3_ROPE)).validate()
    plain = rope_inv_freq(replace(cfg, rope_scaling=None))
    expected = plain / rope_inv_freq(want)
    if table.shape != expected.shape or not torch.allclose(table, expected, rtol=1e-3):
        raise GGUFError(f"{g.path.name}: rope_freqs.weight is not Llama 3.1's RoPE schedule; "
                        "other frequency tables are not supported")
    return want


def checkpoint_dtype(g: GGUFFile) -> torch.dtype | None:
    """The float type the file's weights are stored in; None for a quantized file."""
    return _FILE_TYPE_DTYPE.get(g.get("general.file_type", -1))


def _unpermute(w: torch.Tensor, heads: int) -> torch.Tensor:
    # llama.cpp's convert: w.reshape(heads, 2, d/2, in).swapaxes(1, 2) -> rows of each head
    # interleaved (pair i = rows 2i, 2i+1). Inverse: back to the two-halves layout.
    rows = w.shape[0]
    return (w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).transpose(1, 2)
            .reshape(w.shape))


def _tensor_map(cfg: ModelConfig) -> dict[str, tuple[str, int, int, int]]:
    """GGUF tensor name -> (our parameter, first row, rows, heads to unpermute or 0)."""
    d, nh, nkv, inter, h = (cfg.head_dim, cfg.num_heads, cfg.num_kv_heads,
                            cfg.intermediate_size, cfg.hidden_size)
    out = {"token_embd.weight": ("tok_embeddings.weight", 0, cfg.vocab_size, 0),
           "output_norm.weight": ("norm.weight", 0, h, 0)}
    if not cfg.tie_word_embeddings:
        out["output.weight"] = ("output.weight", 0, cfg.vocab_size, 0)
    for i in range(cfg.num_layers):
        g, o = f"blk.{i}.", f"layers.{i}."
        out[g + "attn_q.weight"] = (o + "attention.wqkv.weight", 0, nh * d, nh)
        out[g + "attn_k.weight"] = (o + "attention.wqkv.weight", nh * d, nkv * d, nkv)
        out[g + "attn_v.weight"] = (o + "attention.wqkv.weight", (nh + nkv) * d, nkv * d, 0)
        out[g + "attn_output.weight"] = (o + "attention.wo.weight", 0, h, 0)
        out[g + "ffn_gate.weight"] = (o + "feed_forward.w13.weight", 0, inter, 0)
        out[g + "ffn_up.weight"] = (o + "feed_forward.w13.weight", inter, inter, 0)
        out[g + "ffn_down.weight"] = (o + "feed_forward.w2.weight", 0, h, 0)
        out[g + "attn_norm.weight"] = (o + "attention_norm.weight", 0, h, 0)
        out[g + "ffn_norm.weight"] = (o + "ffn_norm.weight", 0, h, 0)
    return out


def _fast_dequantize(kind: str, raw: np.ndarray) -> torch.Tensor:
    """Q8_0, Q4_0, Q4_1 in torch over the whole tensor at once: the gguf package's numpy
    version works in row groups and takes seconds for a small model. Same formulas (tested
    equal to the package): blocks of 32 weights, an f16 scale d (and, Q4_1, an f16 minimum
    m); 4-bit weights are the low nibbles of 16 bytes, then the high nibbles."""
    size = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}[kind]
    blocks = torch.from_numpy(raw.reshape(-1, size).copy())
    d = blocks[:, :2].view(torch.float16).float()
    if kind == "Q8_0":
        return d * blocks[:, 2:].view(torch.int8).float()
    packed = blocks[:, size - 16:]
    q = torch.cat([packed & 0x0F, packed >> 4], dim=1).float()
    if kind == "Q4_0":
        return d * (q - 8)
    return d * q + blocks[:, 2:4].view(torch.float16).float()


def dequantize(g: GGUFFile, t: GGUFTensor) -> torch.Tensor:
    """One tensor as a torch tensor of its logical shape ([out, in] for a matrix)."""
    from gguf import GGMLQuantizationType, quants

    kind = t.type_name
    if kind not in SUPPORTED_TYPES:
        raise GGUFError(f"{g.path.name}: tensor {t.name} has quantization type {kind}; "
                        f"supported: {', '.join(SUPPORTED_TYPES)}")
    shape = tuple(int(n) for n in reversed(t.shape))
    raw = t.raw()
    if kind == "F32":
        out = torch.from_numpy(raw.view(np.float32).copy())
    elif kind == "F16":
        out = torch.from_numpy(raw.view(np.float16).copy())
    elif kind in ("Q8_0", "Q4_0", "Q4_1"):
        out = _fast_dequantize(kind, raw)
    else:  # rows of blocks, as bytes -> float32 rows
        rows = max(1, math.prod(shape[:-1]))
        out = torch.from_numpy(quants.dequantize(raw.reshape(rows, -1),
                                                 GGMLQuantizationType(t.type_id)).copy())
    if out.numel() != math.prod(shape):
        raise GGUFError(f"{g.path.name}: tensor {t.name} holds {out.numel()} values, its shape "
                        f"{list(shape)} needs {math.prod(shape)}")
    return out.reshape(shape)


def load_gguf_weights(g: GGUFFile, model: Transformer, dtype: torch.dtype) -> Transformer:
    """Fill an empty Transformer (built from gguf_config(g)) with the file's tensors."""
    cfg = model.config
    params = dict(model.named_parameters())
    wanted = _tensor_map(cfg)
    seen: set[str] = set()
    with torch.no_grad():
        for t in g.tensors:
            if t.name == "rope_freqs.weight":  # folded into cfg.rope_scaling by gguf_config
                continue
            if t.name not in wanted:
                raise GGUFError(f"{g.path.name}: unexpected tensor {t.name!r} "
                                "(not a llama-architecture weight)")
            ours, row, rows, heads = wanted[t.name]
            target = params[ours][row:row + rows]
            w = dequantize(g, t)
            if tuple(w.shape) != tuple(target.shape):
                raise GGUFError(f"{g.path.name}: {t.name} has shape {tuple(w.shape)}, the "
                                f"metadata implies {tuple(target.shape)}")
            if heads:
                w = _unpermute(w, heads)
            target.copy_(w.to(dtype))
            seen.add(t.name)
    missing = sorted(set(wanted) - seen)
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise GGUFError(f"{g.path.name} lacks {', '.join(missing[:3])}{more}")
    return model.eval()
