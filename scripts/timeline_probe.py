"""Where a one-row decode step's time goes, kernel by kernel, on the critical path.

`bench profile` sums kernel durations, which double-count under programmatic dependent
launch (a kernel starts early and waits). Here a graph of a few one-row forwards is
replayed under torch.profiler and every kernel's END is taken: in a PDL chain the step
advances when a kernel finishes, so the gaps between consecutive ends split the step into
the share each launch adds (its "increment"). Printed per launch kind (QKV, attention, O,
feed-forward, ...) as the median over the middle layers, with the kernel's own median
duration and its start relative to the previous kernel's end (negative: it launched early).

  python3 scripts/timeline_probe.py --models tinyllama-1.1b,llama-3.2-1b --window 512

With --prefill T the forward is a T-token kernel prefill (TritonDecode.prefill: T rows a
launch, the head on the last row only) instead of a one-row step, so the two can be set
side by side per launch; --pdl 0 takes PDL off, where durations no longer overlap.
"""

from __future__ import annotations

import argparse
import os
import sys
from statistics import median

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hybridgraph.model.config import preset  # noqa: E402
from hybridgraph.model.fast_decode import TritonDecode  # noqa: E402
from hybridgraph.model.kernel_plan import KernelPlan  # noqa: E402
from hybridgraph.model.loader import random_model  # noqa: E402


def short(name: str) -> str:
    for key in ("gemv_kernel", "ffn_kernel", "decode_attention", "argmax", "index",
                "embedding", "copy", "rope"):
        if key in name:
            return key
    return name[:30]


def probe(name: str, dtype: torch.dtype, window: int, forwards: int, plan: KernelPlan,
          prefill: int = 0) -> None:
    model = random_model(preset(name), torch.device("cuda"), dtype)
    model.setup_caches(1, 2048)
    fast = TritonDecode(model, 1, plan)
    if prefill:  # one prompt of `prefill` tokens into cache row 0, logits of its last
        prompt = torch.full((prefill,), 5, device="cuda")
        row0 = torch.zeros(1, dtype=torch.int64, device="cuda")
        last = torch.tensor([prefill - 1], device="cuda")
        step = lambda: fast.prefill(prompt, row0, last)  # noqa: E731
    else:
        ids = torch.full((1,), 5, device="cuda")
        pos = torch.full((1,), window // 2, device="cuda")
        step = lambda: fast.forward(ids, pos, window)  # noqa: E731
    with torch.no_grad():
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            step()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(forwards):
                step()
        for _ in range(5):
            g.replay()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                g.replay()
            torch.cuda.synchronize()
    ev = sorted((e.time_range.start, e.time_range.end, short(e.name)) for e in prof.events()
                if e.device_type == DeviceType.CUDA and "memcpy" not in e.name.lower())
    layers = model.config.num_layers
    per_fwd = len(ev) // (3 * forwards)
    # Kernels before the first layer (the embedding gather) and after the last (the head).
    lead = next(i for i, e in enumerate(ev) if e[2] == "gemv_kernel")
    per_layer = (per_fwd - lead - 1) // layers
    tail = per_fwd - lead - per_layer * layers
    what = f"{prefill}-token prefill" if prefill else "one-row step"
    print(f"{name} ({what}, pdl {int(plan.pdl)}): {len(ev)} kernels, {per_fwd} a forward, {per_layer} a layer", flush=True)
    if per_fwd * 3 * forwards != len(ev) or tail < 1:
        print("  unexpected kernel sequence:", [k for _, _, k in ev[:per_fwd + 4]])
        return
    print(f"  {(ev[-1][1] - ev[0][0]) / (3 * forwards):.1f} us a forward (span / forwards)")
    # Each kernel named by its place; the increment is the gap between consecutive ends.
    rows: dict[str, list[tuple[float, float, float]]] = {}
    for i in range(1, len(ev)):
        start, end, kname = ev[i]
        f = i % per_fwd
        if f < lead or f >= per_fwd - tail:
            label, mid = f"{kname} (kernel {f} of a forward)", True
        else:
            layer, j = divmod(f - lead, per_layer)
            label, mid = f"{kname} (kernel {j} of a layer)", 0 < layer < layers - 1
        if mid:
            rows.setdefault(label, []).append(
                (end - ev[i - 1][1], end - start, start - ev[i - 1][1]))
    print(f"  {'launch':40s} {'increment':>9s} {'duration':>9s} {'start-prev_end':>15s}")
    for label, vals in rows.items():
        print(f"  {label:40s} {median(v[0] for v in vals):9.2f} "
              f"{median(v[1] for v in vals):9.2f} {median(v[2] for v in vals):15.2f}")
    model.caches = torch.nn.ModuleList()
    torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="tinyllama-1.1b")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--forwards", type=int, default=4)
    ap.add_argument("--ffn", type=int, default=1)
    ap.add_argument("--pdl", type=int, default=1)
    ap.add_argument("--prefill", type=int, default=0, help="T: a T-token prefill's forward")
    a = ap.parse_args()
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    for name in a.models.split(","):
        dtype = torch.float16 if name == "llama-2-7b" else torch.bfloat16
        plan = KernelPlan(fuse_ffn=bool(a.ffn), pdl=bool(a.pdl))
        probe(name, dtype, a.window, a.forwards, plan, a.prefill)


if __name__ == "__main__":
    main()
