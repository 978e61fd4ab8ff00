"""Which SDPA backend is fastest for a long prefill's attention? (issue 10 experiment)

    python scripts/prefill_attention.py [--models llama-2-7b,llama-3.2-1b] [--tokens 128,512]

model/fast_prefill.py calls F.scaled_dot_product_attention on views of the QKV buffer
(causal, GQA through enable_gqa) and lets PyTorch pick the backend; on an H100 that was
cuDNN's (13.5 us a layer at 500 tokens in run 26's profile, with two memsets beside it).
This times the same call, in a CUDA graph of many calls, under each backend that accepts
it, for one layer of each model at each prompt length. One JSON row per measurement, all
of them also in $OUT/prefill_attention.json when OUT is set.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from prefill_gemm import emit, save, time_us  # scripts/: beside this file
from torch.nn.attention import SDPBackend, sdpa_kernel

from hybridgraph.model.config import preset

BACKENDS = {"default": None, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="llama-2-7b,llama-3.2-1b")
    ap.add_argument("--tokens", default="32,128,256,512")
    args = ap.parse_args()
    dev = torch.device("cuda")
    rows = []
    for name in args.models.split(","):
        cfg = preset(name)
        dtype = torch.float16 if name == "llama-2-7b" else torch.bfloat16
        heads, kv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        for t in (int(x) for x in args.tokens.split(",")):
            # The layout glue_prefill hands SDPA: [1, heads + 2 kv, T, D] views of [T, ...].
            qkv = torch.randn(t, heads + 2 * kv, d, device=dev, dtype=dtype)
            view = qkv.view(1, t, heads + 2 * kv, d).transpose(1, 2)
            q, k, v = view[:, :heads], view[:, heads:heads + kv], view[:, heads + kv:]
            ref = None
            for label, backend in BACKENDS.items():
                def fn(q=q, k=k, v=v, gqa=kv != heads):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                          enable_gqa=gqa)
                try:
                    if backend is None:
                        us, out = time_us(fn), fn()
                    else:
                        with sdpa_kernel([backend]):
                            us, out = time_us(fn), fn()
                except RuntimeError as e:
                    emit(rows, {"model": name, "tokens": t, "backend": label,
                                "error": str(e).splitlines()[0][:120]})
                    continue
                ref = out.float() if ref is None else ref
                err = float((out.float() - ref).norm() / ref.norm())
                emit(rows, {"model": name, "tokens": t, "backend": label, "us": round(us, 2),
                            "rel_err_vs_default": round(err, 6)})
    save(rows, "prefill_attention.json")


if __name__ == "__main__":
    main()
