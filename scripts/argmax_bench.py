"""Is the greedy sampler's argmax slower eager than compiled? (issue 10 experiment)

    python scripts/argmax_bench.py [--vocabs 32000,128256] [--rows 1,4,16] [--replays 2000]

Leaving `greedy` eager under the compile backend saves one Dynamo frame at start-up
(docs/KERNELS.md, run 15). This times both forms the way a decode step runs them: captured
in a CUDA graph, 20 calls a graph so launch overhead is shared, CUDA events around each
replay, after a warm-up. Prints median and P99 µs a call for every (vocab, rows, dtype,
form). On 2x H200 the eager argmax was 2 µs (vocab 32000) to 6 µs (128256) slower a
token, so greedy stays compiled. The third form, "triton", is kernels/argmax.py (one launch
split over the vocabulary), which needs no Dynamo frame either.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from hybridgraph.kernels.argmax import argmax
from hybridgraph.kernels.workspace import Workspace
from hybridgraph.runtime.dynamic import greedy

CALLS = 20  # argmax calls captured in one graph


def time_graph(fn, logits: torch.Tensor, replays: int) -> list[float]:
    """µs a call, one value a replay of a graph holding CALLS calls of fn(logits)."""
    out = torch.empty(logits.shape[0], dtype=torch.int64, device=logits.device)
    for _ in range(3):  # compile, autotune and warm up outside the capture
        out.copy_(fn(logits))
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(CALLS):
            out.copy_(fn(logits))
    for _ in range(50):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(replays):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / CALLS)
    assert torch.equal(out, logits.argmax(-1)), "wrong argmax"
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocabs", default="32000,128256")
    ap.add_argument("--rows", default="1,4,16")
    ap.add_argument("--replays", type=int, default=2000)
    args = ap.parse_args()
    print(f"device: {torch.cuda.get_device_name()}; {CALLS} calls a graph, "
          f"{args.replays} replays; µs a call")
    torch._dynamo.config.recompile_limit = 64  # one compile a shape and dtype, as the runtime
    compiled = torch.compile(lambda x: torch.argmax(x, dim=-1), dynamic=False, fullgraph=True)
    ws = Workspace(1 << 16, 64, "cuda")
    out = torch.empty(64, dtype=torch.int64, device="cuda")
    forms = {"eager": lambda x: greedy(x, *(None,) * 5), "compiled": compiled,
             "triton": lambda x: argmax(x, out[:x.shape[0]], ws)}
    for vocab in map(int, args.vocabs.split(",")):
        for rows in map(int, args.rows.split(",")):
            for dtype in (torch.float16, torch.bfloat16, torch.float32):
                logits = torch.randn(rows, vocab, device="cuda").to(dtype)
                line = [f"vocab {vocab:6d} rows {rows:2d} {str(dtype)[6:]:8s}"]
                for name, fn in forms.items():
                    t = sorted(time_graph(fn, logits, args.replays))
                    p99 = t[int(0.99 * (len(t) - 1))]
                    line.append(f"{name} {statistics.median(t):6.2f} (p99 {p99:6.2f})")
                print("  ".join(line), flush=True)


if __name__ == "__main__":
    main()
