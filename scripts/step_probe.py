"""What a whole decode step costs beyond its forward: the engine's own loop, profiled.

scripts/timeline_probe.py times forwards replayed back to back inside one graph. A real
step is one graph replay (forward, sampler) followed by the token's copy to the host, and
the next step's graph starts only after both. Here an Engine generates under torch.profiler
and the GPU's activity is split at each step's first kernel: the step period, the time from
its first kernel's start to its last kernel's end (the graph), and the gap until the next
step's first kernel (the copy to the host and the graph launch).

  python3 scripts/step_probe.py --models tinyllama-1.1b,llama-3.2-1b --tokens 96
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

from hybridgraph.engine import Engine  # noqa: E402


def probe(name: str, dtype: str, tokens: int, copies: bool) -> None:
    engine = Engine.load(name, device="cuda", dtype=dtype, max_seq_len=1024)
    prompt = list(range(10, 20))
    engine.generate(prompt, tokens, stop_ids=[])  # warm-up
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        if copies:
            engine.generate(prompt, tokens, stop_ids=[])
        else:  # the same decode graphs replayed back to back, no token copied out
            with torch.inference_mode():
                for i in range(tokens):
                    engine._decode(1, len(prompt) + i, "greedy")
        torch.cuda.synchronize()
    ev = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                if e.device_type == DeviceType.CUDA)
    # A decode step's first kernel gathers the embedding (the prefill's gathers come first).
    firsts = [i for i, e in enumerate(ev)
              if ("embed" in e[2] or "index" in e[2]) and "memcpy" not in e[2].lower()]
    steps = []
    for a, b in zip(firsts[3:], firsts[4:], strict=False):  # past the prefill's
        step = ev[a:b]
        kernels = [e for e in step if "memcpy" not in e[2].lower()]
        memcpys = [e for e in step if "memcpy" in e[2].lower()]
        last_end = max(e[1] for e in kernels)
        steps.append((ev[b][0] - ev[a][0], last_end - ev[a][0], ev[b][0] - last_end,
                      sum(e[1] - e[0] for e in memcpys), len(kernels)))
    print(f"{name} ({dtype}, {torch.cuda.get_device_name()}, "
          f"{'engine.generate' if copies else 'graphs alone'}): {len(steps)} steps, "
          f"{median(s[4] for s in steps)} kernels a step")
    for i, label in enumerate(("period", "first kernel start to last kernel end",
                               "last kernel end to next step's first kernel",
                               "memcpy time inside that")):
        vals = sorted(s[i] for s in steps)
        print(f"  {label:48s} median {median(vals):8.2f} us  p90 "
              f"{vals[int(0.9 * (len(vals) - 1))]:8.2f}")
    tail = ev[firsts[-2] - 6:firsts[-2] + 2]
    print("  around a step boundary:")
    t0 = tail[0][0]
    for s, e, n in tail:
        print(f"    {s - t0:9.2f} .. {e - t0:9.2f}  {n[:70]}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="tinyllama-1.1b")
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--graphs-alone", action="store_true",
                    help="also replay the decode graphs back to back with no token copy")
    a = ap.parse_args()
    for name in a.models.split(","):
        dtype = "float16" if name == "llama-2-7b" else "bfloat16"
        probe(name, dtype, a.tokens, copies=True)
        if a.graphs_alone:
            probe(name, dtype, a.tokens, copies=False)


if __name__ == "__main__":
    main()
