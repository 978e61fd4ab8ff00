"""Is the greedy sampler's argmax slower eager than compiled? (issue 10 experiment)

    python scripts/argmax_bench.py [--vocabs 32000,128256] [--rows 1,4,16] [--replays 2000]
    python scripts/argmax_bench.py --sample [--temperature 0.7 --top-k 50 --top-p 0.9]

Leaving `greedy` eager under the compile backend saves one Dynamo frame at start-up
(docs/KERNELS.md, run 15). This times both forms the way a decode step runs them: captured
in a CUDA graph, 20 calls a graph so launch overhead is shared, CUDA events around each
replay, after a warm-up. Prints median and P99 µs a call for every (vocab, rows, dtype,
form). On 2x H200 the eager argmax was 2 µs (vocab 32000) to 6 µs (128256) slower a
token, so greedy stays compiled. The third form, "triton", is kernels/argmax.py (one launch
split over the vocabulary), which needs no Dynamo frame either.

--sample times the sampling sampler instead, float32 logits as the runtime gives it:
`runtime.dynamic.sample` compiled (as the engine runs it today) against kernels/sampling.py
(a sort, the argmax kernel, one kernel), every row with the given parameters, and says
whether the two drew the same tokens.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from hybridgraph.kernels.argmax import argmax
from hybridgraph.kernels.workspace import Workspace
from hybridgraph.runtime.dynamic import greedy

CALLS = 20  # argmax calls captured in one graph


def time_graph(fn, logits: torch.Tensor, replays: int, check: bool = True,
               ) -> tuple[list[float], torch.Tensor]:
    """µs a call, one value a replay of a graph holding CALLS calls of fn(logits), and the
    tokens of the last call; check: they must be torch.argmax's."""
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
    assert not check or torch.equal(out, logits.argmax(-1)), "wrong argmax"
    return times, out.clone()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocabs", default="32000,128256")
    ap.add_argument("--rows", default="1,4,16")
    ap.add_argument("--replays", type=int, default=2000)
    ap.add_argument("--sample", action="store_true", help="the sampling sampler instead")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--top-k", type=int, default=50)
    ap.add_argument("--top-p", type=float, default=0.9)
    args = ap.parse_args()
    if args.sample:
        return sample_main(args)
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
                    t = sorted(time_graph(fn, logits, args.replays)[0])
                    p99 = t[int(0.99 * (len(t) - 1))]
                    line.append(f"{name} {statistics.median(t):6.2f} (p99 {p99:6.2f})")
                print("  ".join(line), flush=True)


def sample_main(args: argparse.Namespace) -> None:
    from hybridgraph.kernels.sampling import sample as kernel_sample
    from hybridgraph.runtime.dynamic import dynamic_ops

    print(f"device: {torch.cuda.get_device_name()}; {CALLS} calls a graph, {args.replays} "
          f"replays; µs a call; T {args.temperature} top-k {args.top_k} top-p {args.top_p}")
    torch._dynamo.config.recompile_limit = 64
    compiled = dynamic_ops("compile").sample
    ws = Workspace(1 << 16, 64, "cuda")
    out = torch.empty(64, dtype=torch.int64, device="cuda")
    for vocab in map(int, args.vocabs.split(",")):
        for rows in map(int, args.rows.split(",")):
            dev = dict(device="cuda")
            params = (torch.full((rows,), args.temperature, **dev),
                      torch.full((rows,), args.top_k, dtype=torch.int64, **dev),
                      torch.full((rows,), args.top_p, **dev),
                      torch.arange(rows, dtype=torch.int64, **dev),
                      torch.full((rows,), 7, dtype=torch.int64, **dev))
            logits = torch.randn(rows, vocab, **dev) * 3
            forms = {"compiled": lambda x, p=params: compiled(x, *p),
                     "kernel": lambda x, p=params: kernel_sample(x, *p, out[:x.shape[0]], ws)}
            line, drawn = [f"vocab {vocab:6d} rows {rows:2d}"], []
            for name, fn in forms.items():
                times, tokens = time_graph(fn, logits, args.replays, check=False)
                t = sorted(times)
                drawn.append(tokens)
                line.append(f"{name} {statistics.median(t):6.2f} "
                            f"(p99 {t[int(0.99 * (len(t) - 1))]:6.2f})")
            line.append("same tokens" if torch.equal(*drawn) else "TOKENS DIFFER")
            print("  ".join(line), flush=True)


if __name__ == "__main__":
    main()
