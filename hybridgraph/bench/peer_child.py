"""Child process of the `peers` suite: HF transformers `LlamaForCausalLM.generate` on the
same shape, weights, prompts and device as hybridgraph. Writes one JSON file.

impl `eager`: the default dynamic cache. impl `static`: cache_implementation="static",
with which HF compiles the decode step itself (torch.compile, mode reduce-overhead) on
CUDA; it does not compile on the CPU, and the output says which happened.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from hybridgraph.bench.table import make_prompt, summarize
from hybridgraph.engine import DTYPES
from hybridgraph.model.config import PRESETS
from hybridgraph.model.loader import _hf_param_map, load_model


def build_hf(model: str, device: torch.device, dtype: torch.dtype) -> tuple[Any, float]:
    """The HF model holding exactly our weights, and the relative logit error between the
    two on one prompt (a check that the comparison is like for like)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if model not in PRESETS:
        import transformers

        # transformers renamed torch_dtype to dtype in 4.56; older ones ignore `dtype`.
        major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
        key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
        hf = LlamaForCausalLM.from_pretrained(model, **{key: dtype}).to(device).eval()
        return hf, float("nan")
    ours, _ = load_model(model, device, dtype)
    cfg = ours.config
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            hf = LlamaForCausalLM(LlamaConfig(**cfg.to_hf_dict())).eval()
    finally:
        torch.set_default_dtype(old)
    params = dict(ours.named_parameters())
    hf_params = dict(hf.named_parameters())
    with torch.no_grad():
        for name, (mine, row, rows) in _hf_param_map(cfg).items():
            hf_params[name].copy_(params[mine][row:row + rows])
        ids = torch.tensor([make_prompt(16, cfg.vocab_size)], device=device)
        ours.setup_caches(1, 16)
        ref = ours.prefill(ids).float()
        got = hf(ids).logits.float()
        err = float((got - ref).norm() / ref.norm())
    del ours, params
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return hf, err


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--device", required=True)
    p.add_argument("--dtype", required=True)
    p.add_argument("--impl", choices=["eager", "static"], required=True)
    p.add_argument("--lengths", required=True, help="comma-separated prompt lengths")
    p.add_argument("--runs", type=int, required=True)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--decode-prompt", type=int, required=True)
    p.add_argument("--decode-new", type=int, required=True)
    p.add_argument("--decode-runs", type=int, required=True)
    p.add_argument("--max-cache-len", type=int, required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    from transformers import GenerationConfig

    device = torch.device(args.device)
    hf, err = build_hf(args.model, device, DTYPES[args.dtype])
    vocab = hf.config.vocab_size
    hf.generation_config.eos_token_id = None   # every run generates its full length
    hf.generation_config.pad_token_id = 0
    kw: dict[str, Any] = {"do_sample": False}
    first_new = 16
    if args.impl == "static":
        kw["cache_implementation"] = "static"
        # One cache size for every call, so the compiled decode is never recompiled.
        if hasattr(GenerationConfig(), "max_cache_len"):
            kw["max_cache_len"] = args.max_cache_len
        else:
            # Older transformers size the static cache by the largest call so far.
            first_new = args.max_cache_len - args.decode_prompt

    def generate(prompt: list[int], new: int) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        ids = torch.tensor([prompt], dtype=torch.int64).to(device)
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, **kw)
        tokens = out[0, len(prompt):].tolist()   # on the host: the device work is done
        ms = (time.perf_counter() - t0) * 1e3
        if len(tokens) != new:
            raise RuntimeError(f"HF generated {len(tokens)} tokens, asked for {new}")
        return ms

    name = f"hf-{args.impl}"
    dp = make_prompt(args.decode_prompt, vocab)
    generate(dp, first_new)
    for _ in range(args.warmup):
        generate(dp, 16)
    ttft: dict[str, Any] = {}
    lengths = [int(x) for x in args.lengths.split(",")]
    with tqdm(total=len(lengths) * args.runs, desc=f"{name} ttft", unit="run") as bar:
        for n in lengths:
            prompt = make_prompt(n, vocab)
            for _ in range(args.warmup):
                generate(prompt, 1)
            samples = []
            for _ in range(args.runs):
                samples.append(generate(prompt, 1))
                bar.update(1)
            ttft[str(n)] = summarize(samples)
    first, full = [], []
    for _ in tqdm(range(args.decode_runs), desc=f"{name} decode", unit="run"):
        first.append(generate(dp, 1))
        full.append(generate(dp, args.decode_new))
    # Decode per token: the long run minus its prefill, over the tokens after the first.
    decode_ms = (float(np.median(full)) - float(np.median(first))) / (args.decode_new - 1)
    compiled = getattr(hf, "_compiled_call", None) is not None
    Path(args.out).write_text(json.dumps({
        "system": name, "impl": args.impl, "compiled": compiled, "logit_rel_err": err,
        "ttft": ttft, "decode_ms_per_token": decode_ms, "decode_total_ms": float(np.median(full)),
        "decode_new": args.decode_new, "decode_prompt": args.decode_prompt,
        "attn_implementation": str(getattr(hf.config, "_attn_implementation", "unknown")),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
