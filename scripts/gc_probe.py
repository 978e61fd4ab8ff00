"""Do Python's garbage collections land inside requests? (issue 10: TTFT P99 outliers)

    python scripts/gc_probe.py [--model llama-2-7b] [--lengths 10,250] [--runs 200]

One engine (hybrid). For each prompt length, `runs` one-token requests back to back, four
times: as the process is, then after gc.collect() + gc.freeze() (every object alive
moved out of the collector's sight, as vLLM and SGLang do after capturing graphs), then
unfrozen, then frozen again. Every collection is timed through gc.callbacks. Prints per
pass the TTFT median / P99 / max (ms) and, per generation, how many collections ran and
the longest pause (ms), so an outlier can be matched to a pause or cleared of one.
"""

from __future__ import annotations

import gc
import statistics
import time

import torch
from probe_common import probe_engine, probe_parser  # scripts/: beside this file

from hybridgraph.bench.table import make_prompt

_pauses: list[tuple[int, float]] = []   # (generation, ms) of each collection
_started: list[float] = []


def _on_gc(phase: str, info: dict) -> None:
    if phase == "start":
        _started.append(time.perf_counter())
    elif _started:
        _pauses.append((info["generation"], (time.perf_counter() - _started.pop()) * 1e3))


def main() -> None:
    args = probe_parser(lengths="10,250", runs=200).parse_args()
    engine = probe_engine(args.model)
    print(torch.cuda.get_device_name(), "objects tracked:", len(gc.get_objects()), flush=True)
    gc.callbacks.append(_on_gc)
    for n in map(int, args.lengths.split(",")):
        prompt = make_prompt(n, engine.config.vocab_size)
        for frozen in (False, True, False, True):
            if frozen:
                gc.collect()
                gc.freeze()
            else:
                gc.unfreeze()
            for _ in range(5):
                engine.generate(prompt, 1, stop_ids=[])
            _pauses.clear()
            t = sorted(engine.generate(prompt, 1, stop_ids=[]).ttft_ms for _ in range(args.runs))
            per_gen = {g: [ms for gg, ms in _pauses if gg == g] for g in (0, 1, 2)}
            print({"len": n, "frozen": frozen, "ttft_median": round(statistics.median(t), 3),
                   "ttft_p99": round(t[int(0.99 * (len(t) - 1))], 3), "ttft_max": round(t[-1], 3),
                   "collections": {g: len(v) for g, v in per_gen.items()},
                   "longest_pause_ms": {g: round(max(v), 2) for g, v in per_gen.items() if v}},
                  flush=True)
    gc.callbacks.remove(_on_gc)
    gc.unfreeze()


if __name__ == "__main__":
    main()
