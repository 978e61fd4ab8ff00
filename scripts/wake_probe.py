"""Which CUDA calls does a request after idle pay for? (issue 10 experiment)

    python scripts/wake_probe.py [--gap 0.2] [--runs 30]

ttft_probe.py --idle found a 10-token request after 0.2 s of idle paying ~0.3 ms on the
host, its first CUDA calls 10-17x slower than back to back (KERNELS.md run 36). This
times, on the host, single calls right after the host sleeps `gap` seconds, no model
needed: an event record, a 16-id pinned copy to the GPU, a small graph's replay; and the
three in a row, as a prefill makes them, each call's own µs: whether only the first call
after idle pays (then a prefill making no call before its graph's launch would pay once)
or each does. Medians over `runs`, back to back (gap 0) beside them.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gap", type=float, default=0.2)
    ap.add_argument("--runs", type=int, default=30)
    args = ap.parse_args()
    host = torch.arange(16, dtype=torch.int64).pin_memory()
    dev = torch.zeros(16, dtype=torch.int64, device="cuda")
    x = torch.randn(64, 64, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            y = x @ x
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(8):
            y = y @ x
    calls = {"event_record": lambda: torch.cuda.Event().record(),
             "copy_16_ids": lambda: dev.copy_(host, non_blocking=True),
             "graph_replay": graph.replay}
    print(torch.cuda.get_device_name(), flush=True)
    for gap in (0.0, args.gap):
        res: dict[str, list[float]] = {}
        for name, fn in calls.items():  # each call alone, first after the rest
            for _ in range(args.runs):
                torch.cuda.synchronize()
                time.sleep(gap)
                t0 = time.perf_counter()
                fn()
                res.setdefault(name + "_alone", []).append((time.perf_counter() - t0) * 1e6)
        for _ in range(args.runs):  # the three in a row, as a prefill makes them
            torch.cuda.synchronize()
            time.sleep(gap)
            stamps = [time.perf_counter()]
            for fn in (calls["copy_16_ids"], calls["event_record"], calls["graph_replay"]):
                fn()
                stamps.append(time.perf_counter())
            for name, a, b in zip(("copy", "then_event", "then_replay"), stamps[:-1], stamps[1:],
                                  strict=True):
                res.setdefault("in_a_row_" + name, []).append((b - a) * 1e6)
        torch.cuda.synchronize()
        print({"gap_s": gap, **{k: round(statistics.median(v), 1) for k, v in res.items()}},
              flush=True)


if __name__ == "__main__":
    main()
