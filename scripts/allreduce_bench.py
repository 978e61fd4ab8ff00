"""All-reduce per call at decode sizes, without a model: parallel/allreduce.measure alone.

    torchrun --nproc-per-node N scripts/allreduce_bench.py [--hidden 4096,8192] [--rows 1,8,64]

Every rank runs it (collective); rank 0 prints one line per (method, hidden, rows) and,
with OUT set, writes OUT/allreduce-<N>ranks-<tag>.json. Which hybridgraph it times is
whichever PYTHONPATH imports, so the tree before a change (a copy in .base) and after can
be timed in one call on one machine (docs/METHOD: the things compared in the same run).
`hybridgraph bench tp` records the same table beside a model's decode; this is the quick
look at the kernel alone. NCCL_NVLS_ENABLE=0 and TORCH_SYMM_MEM_DISABLE_MULTICAST=1 must
be set by the caller (scripts/gpu_round.sh does).
"""

from __future__ import annotations

import argparse
import json
import os

import torch

import hybridgraph
from hybridgraph.parallel.allreduce import measure
from hybridgraph.parallel.group import init_group


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", default="4096,8192")
    ap.add_argument("--rows", default="1,8,64")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--iters", type=int, default=500)
    ap.add_argument("--tag", default="")
    ap.add_argument("--device", default="cuda", help="cpu: gloo (a smoke test)")
    a = ap.parse_args()
    world = int(os.environ["WORLD_SIZE"])
    group = init_group(world, a.device)
    dtype = getattr(torch, a.dtype)
    rows = [int(r) for r in a.rows.split(",")]
    results = []
    for hidden in (int(h) for h in a.hidden.split(",")):
        for t in measure(group, hidden, dtype, rows, a.iters):
            results.append({"hidden": hidden, **vars(t)})
    if group.rank == 0:
        where = os.path.dirname(hybridgraph.__file__)
        device = torch.cuda.get_device_name() if a.device == "cuda" else "cpu"
        print(f"{device} x{world}  {a.dtype}  hybridgraph from {where}")
        for r in results:
            if not r["error"]:
                print(f"{r['method']:18s} hidden {r['hidden']:5d} rows {r['rows']:3d} "
                      f"{r['nbytes']:8d} B  graph {r['graph_us']:7.2f} us  "
                      f"eager {r['eager_us']:7.2f} us")
        out = os.environ.get("OUT")
        if out:
            fname = f"allreduce-{world}ranks{'-' + a.tag if a.tag else ''}.json"
            with open(os.path.join(out, fname), "w") as f:
                json.dump({"device": device, "world": world,
                           "tree": where, "rows": results}, f, indent=1)
    group.close()


if __name__ == "__main__":
    main()
