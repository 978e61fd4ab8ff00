"""Registers, spills and shared memory of a decode step's kernels, for sm_90, on the CPU.

    python scripts/kernel_regs.py [--models tinyllama-1.1b,llama-3.2-1b,llama-2-7b]
                                  [--dtype bfloat16] [--window 512] [--block-t 64,32]
                                  [--attn-warps 4,8] [--rows 1]

A launch's registers a thread bound how many of its programs an SM holds, and a kernel
that runs out of them spills to local memory (the "stack" column: bytes a thread). Both
have decided plans before (KERNELS.md runs 24, 25 and 29) and were read off a GPU. Here
each launch of a preset's step of --rows rows (16: what a short prefill runs) is made as
TritonDecode makes it (the default plan's configs, late PDL), on CPU tensors of the real
shapes, with `launch` swapped for a
recorder; each recorded launch is specialized as Triton's JIT would specialize it on a
GPU (pointers 16-byte aligned, integers divisible by 16 or equal to 1, `do_not_specialize`
honoured), compiled for sm_90, and the cuobjdump that ships with Triton reads the cubin's
resource usage. Attention is listed for each --block-t and --attn-warps asked
(KernelPlan.block_t; decode_attention's num_warps), and how many places each kernel's
code waits for a warpgroup (wgmma) product. No GPU needed. It compiles with the Triton it
imports: to see what the GPUs' Triton makes, put that version's wheel, unpacked, first on
PYTHONPATH (its bundled ptxas and cuobjdump made executable).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
from collections.abc import Callable
from typing import Any

import torch
import triton
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import BaseBackend, GPUTarget
from triton.compiler import ASTSource

from hybridgraph.kernels import argmax, attention, ffn, gemv
from hybridgraph.kernels.workspace import Workspace
from hybridgraph.model.config import preset
from hybridgraph.model.fast_decode import TritonDecode
from hybridgraph.model.kernel_plan import KernelPlan
from hybridgraph.model.llama import Transformer

Launch = tuple[Any, tuple, dict]  # kernel, positional arguments, keyword arguments
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def record(make: Callable[[], Any]) -> list[Launch]:
    """The launches `make()` makes through the kernel modules' `launch`, not run."""
    seen: list[Launch] = []
    mods = (gemv, attention, ffn, argmax)
    saved = [m.launch for m in mods]
    for m in mods:
        m.launch = lambda kernel, grid, *args, **kw: seen.append((kernel, args, kw))
    try:
        make()
    finally:
        for m, f in zip(mods, saved, strict=True):
            m.launch = f
    return seen


def resources(kernel: Any, args: tuple, kwargs: dict) -> dict[str, int]:
    """{'regs', 'stack', 'shared', 'mma_waits'} of the kernel Triton's JIT would compile
    for these arguments on an sm_90 GPU."""
    sig, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(kernel.params):
        value = args[i] if i < len(args) else kwargs[p.name]
        if p.is_constexpr:
            sig[p.name], constexprs[p.name] = "constexpr", value
            continue
        ty, key = native_specialize_impl(BaseBackend, value, False, not p.do_not_specialize,
                                         not p.do_not_specialize_on_alignment)
        if ty == "constexpr":  # an integer 1
            sig[p.name], constexprs[p.name] = "constexpr", key
            continue
        sig[p.name] = ty
        if key and "D" in key:
            attrs[(i,)] = [["tt.divisibility", 16]]
    options = {k: kwargs[k] for k in ("num_warps", "num_stages", "launch_pdl") if k in kwargs}
    compiled = triton.compile(ASTSource(kernel, sig, constexprs=constexprs, attrs=attrs),
                              target=GPUTarget("cuda", 90, 32), options=options)
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                        "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                               text=True, check=True).stdout
    regs, stack = re.search(r"REG:(\d+)", usage), re.search(r"STACK:(\d+)", usage)
    if regs is None or stack is None:
        raise RuntimeError(f"no resource usage in cuobjdump's output: {usage[-400:]}")
    # Places the code waits for Hopper's asynchronous warpgroup products (the count in the
    # code, not per step): a loop that waits after each of its products serializes them.
    waits = compiled.asm["ptx"].count("wgmma.wait_group")
    return {"regs": int(regs[1]), "stack": int(stack[1]), "shared": compiled.metadata.shared,
            "mma_waits": waits}


def step_launches(model: str, dtype: torch.dtype, window: int, block_ts: list[int],
                  warps: list[int], rows: int = 1) -> list[tuple[str, Launch]]:
    """(label, launch) of one layer and the head of `model`'s step of `rows` rows on the
    default plan: TritonDecode's configs (built on the meta device: shapes only; gemv
    takes its batched rule for 2+ rows itself), its launches made on empty CPU tensors."""
    cfg = preset(model)
    with torch.device("meta"):
        fast = TritonDecode(Transformer(cfg), 1, KernelPlan())
    c = fast.configs
    h, heads, kv, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    inter, vocab = cfg.intermediate_size, cfg.vocab_size

    def new(*shape: int, dt: torch.dtype = dtype) -> torch.Tensor:
        return torch.empty(*shape, dtype=dt)

    ws = Workspace(1 << 22, 1 << 14, "cpu")
    b = rows
    x, q, o = new(b, h), new(b, heads * d), new(b, heads * d)
    pos = torch.zeros(b, dtype=torch.int64)
    k_cache, v_cache = new(b, kv, window, d), new(b, kv, window, d)
    rope = gemv.RopeArgs(new(window, d), new(window, d), pos, k_cache, v_cache, heads, kv)
    out: list[tuple[str, Launch]] = []

    def add(label: str, make: Callable[[], Any]) -> None:
        out.extend((label, launch) for launch in record(make))

    add("gemv qkv", lambda: gemv.gemv(x, new((heads + 2 * kv) * d, h), q, ws, c["qkv"],
                                      epi=gemv.EPI_ROPE, norm_w=new(h), rope=rope, pdl=2))
    for bt in block_ts:
        for w in warps:
            add(f"attention block_t {bt} warps {w}" + (" early_kv" if fast.early_kv else ""),
                lambda bt=bt, w=w: attention.decode_attention(
                    q, k_cache, v_cache, pos, window, o, ws, block_t=bt, num_warps=w, pdl=2,
                    early_kv=fast.early_kv))
    add("gemv wo", lambda: gemv.gemv(o, new(h, heads * d), new(b, h), ws, c["wo"],
                                     epi=gemv.EPI_RESID, residual=x, pdl=2))
    w13, w2 = new(2 * inter, h), new(h, inter)
    if fast.fused_ffn and b == 1:
        add("ffn (gate/up + down)", lambda: ffn.ffn(x, w13, new(h), w2, x, new(1, inter),
                                                    new(1, h), ws, c["w13"], c["w2"], pdl=2))
    else:
        add("gemv w13", lambda: gemv.gemv(x, w13, new(b, inter), ws, c["w13"],
                                          epi=gemv.EPI_SILU, norm_w=new(h), pdl=2))
        add("gemv w2", lambda: gemv.gemv(new(b, inter), w2, new(b, h), ws, c["w2"],
                                         epi=gemv.EPI_RESID, residual=x, pdl=2))
    logits = new(b, vocab, dt=torch.float32)
    add("gemv head", lambda: gemv.gemv(x, new(vocab, h), logits, ws, c["head"],
                                       norm_w=new(h), pdl=2))
    add("argmax", lambda: argmax.argmax(logits, torch.empty(b, dtype=torch.int64), ws,
                                        pdl=True))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="tinyllama-1.1b,llama-3.2-1b,llama-2-7b")
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--block-t", default="64,32")
    ap.add_argument("--attn-warps", default="4,8")
    ap.add_argument("--rows", type=int, default=1)
    a = ap.parse_args()
    block_ts = [int(v) for v in a.block_t.split(",")]
    warps = [int(v) for v in a.attn_warps.split(",")]
    print(f"# sm_90, {a.dtype}, {a.rows} row(s), window {a.window}, Triton {triton.__version__}: "
          "registers a thread, stack (spill) bytes a thread, shared memory bytes")
    for model in a.models.split(","):
        for label, (kernel, args, kwargs) in step_launches(model, DTYPES[a.dtype], a.window,
                                                           block_ts, warps, a.rows):
            r = resources(kernel, args, kwargs)
            print(f"{model:15} {label:40} regs {r['regs']:4}  stack {r['stack']:4}  "
                  f"shared {r['shared']:6}  mma_waits {r['mma_waits']}", flush=True)


if __name__ == "__main__":
    main()
