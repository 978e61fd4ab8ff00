"""A kernel prefill's forward (TritonDecode.prefill, 2-16 rows a launch) under other
batched GEMV tiles: which config rule holds the 10-token TTFT (docs/KERNELS.md run 30).

Each variant wraps `gemv.default_config` (the rule the GEMV takes for 2+ rows) while its
TritonDecode is built and its graph captured; the graphs then replay round-robin, 25
rounds of 4 prefills each, so every variant sees the same machine state. Each variant's
TritonDecode is kept alive until its graph is done with (its buffers must not be handed
to the next variant). Logits are compared with the default's (maxdiff: split-K changes
the order of the sums).

  --sweep stages: the swapped tiles of QKV and gate/up (half, block_k, stages, the
                  programs-per-SM factor under which they split K, warps)
  --sweep splits: split-K of QKV, O or down, as multiples of the rule's

  python3 scripts/prefill_tiles.py --sweep splits --models llama-2-7b,llama-3.2-1b
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kernel_bench import floor_section, weight_floor_us  # noqa: E402

from hybridgraph.kernels import gemv as G  # noqa: E402
from hybridgraph.kernels import gemv_config as GC  # noqa: E402
from hybridgraph.model.config import preset  # noqa: E402
from hybridgraph.model.fast_decode import TritonDecode  # noqa: E402
from hybridgraph.model.kernel_plan import KernelPlan  # noqa: E402
from hybridgraph.model.loader import random_model  # noqa: E402

ORIG = GC.default_config
# (half, block_k, stages, split while tiles * split < factor * SMs, warps); None: the rule
STAGES = {"base": None,
          "st3": (128, 64, 3, 0.4, 4), "st5": (128, 64, 5, 0.4, 4), "f1": (128, 64, 4, 1.0, 4),
          "h64st4": (64, 64, 4, 0.4, 4), "h64st6": (64, 64, 6, 0.4, 4),
          "h64st8": (64, 64, 8, 0.4, 4), "h64f1": (64, 64, 4, 1.0, 4),
          "h64st6f1": (64, 64, 6, 1.0, 4)}
QKV, WO, DOWN = "qkv", "wo", "down"
# projection -> multiple of the rule's split-K
SPLITS = {"base": {}, "qs2": {QKV: 2}, "qs4": {QKV: 4}, "os2": {WO: 0.5}, "os8": {WO: 2},
          "ds8": {DOWN: 2}, "qs2os8": {QKV: 2, WO: 2}, "qs4os8": {QKV: 4, WO: 2}}


def stages_rule(v):
    def cfg(n, k, sms=132, epi=0, norm=False, d_half=64, rows=1):
        if v is None or rows == 1 or not norm:
            return ORIG(n, k, sms, epi, norm, d_half, rows)
        half, bk, st, f, w = v
        tiles, split = GC.config_tiles(epi, n, half, d_half), 1
        while tiles * split < f * sms and k // (2 * split) >= 512:
            split *= 2
        return GC.GemvConfig(half=half, block_k=bk, split_k=split, num_warps=w,
                             num_stages=st, swap=True)
    return cfg


def splits_rule(v):
    def cfg(n, k, sms=132, epi=0, norm=False, d_half=64, rows=1):
        c = ORIG(n, k, sms, epi, norm, d_half, rows)
        if rows == 1:
            return c
        proj = QKV if epi == GC.EPI_ROPE else (WO if n == k else DOWN) if not norm else None
        m = v.get(proj)
        return c if m is None else c._replace(split_k=max(1, int(c.split_k * m)))
    return cfg


def run(name: str, dtype: torch.dtype, tokens: list[int], variants: dict, rule,
        tbps: float) -> None:
    model = random_model(preset(name), torch.device("cuda"), dtype)
    model.setup_caches(1, 2048)
    floor_us = weight_floor_us(model, tbps)
    row0 = torch.zeros(1, dtype=torch.int64, device="cuda")
    for t in tokens:
        ids = torch.full((1, t), 5, device="cuda")
        last = torch.tensor([t - 1], device="cuda")
        graphs, outs, keep = {}, {}, []  # keep: each variant's buffers stay alive
        for vn, v in variants.items():
            G.default_config = rule(v)
            try:
                fast = TritonDecode(model, 1, KernelPlan())
                s = torch.cuda.Stream()
                s.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(s), torch.no_grad():
                    for _ in range(2):
                        fast.prefill(ids[0], row0, last)
                torch.cuda.current_stream().wait_stream(s)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g), torch.no_grad():
                    for _ in range(4):
                        out = fast.prefill(ids[0], row0, last)
                g.replay()
                torch.cuda.synchronize()
                graphs[vn], outs[vn] = g, out
                keep.append(fast)
            except Exception as e:  # noqa: BLE001
                print(f"{name} t={t} {vn}: FAILED {type(e).__name__}: {e}", flush=True)
            finally:
                G.default_config = ORIG
        times: dict[str, list[float]] = {vn: [] for vn in graphs}
        for _ in range(25):
            for vn, g in graphs.items():
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                g.replay()
                b.record()
                b.synchronize()
                times[vn].append(a.elapsed_time(b) * 1e3 / 4)
        for vn, ts in times.items():
            med = statistics.median(ts)
            err = (outs[vn] - outs["base"]).abs().max().item()
            print(f"{name} t={t} {vn:9s} {med:8.1f} us  p90 {sorted(ts)[22]:8.1f}  "
                  f"floor@{tbps:.2f} {floor_us / med:.3f}  maxdiff {err:.2e}", flush=True)
    del model
    torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", choices=("stages", "splits"), default="splits")
    ap.add_argument("--models", default="llama-2-7b,llama-3.2-1b")
    ap.add_argument("--tokens", default="10,16")
    a = ap.parse_args()
    variants, rule = (STAGES, stages_rule) if a.sweep == "stages" else (SPLITS, splits_rule)
    print(torch.cuda.get_device_name())
    tbps = floor_section()  # this run's copy bandwidth, TB/s: the floors' yardstick
    for name in a.models.split(","):
        dtype = torch.float16 if name == "llama-2-7b" else torch.bfloat16
        run(name, dtype, [int(t) for t in a.tokens.split(",")], variants, rule, tbps)


if __name__ == "__main__":
    main()
