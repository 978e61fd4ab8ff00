"""What does a sampled token cost over a greedy one, in a whole engine? (issue 10, run 19)

    python scripts/sampled_decode_probe.py [--model llama-3.2-1b] [--dtype bfloat16]
                                           [--tokens 128] [--rounds 12] [--tag new]

One hybrid engine (the Triton kernels where they pass) generates from a 10-token prompt,
greedy and sampled (temperature 0.7, top-k 50, top-p 0.9, a seed) alternating over
`rounds` rounds after a warm-up, so drift is not mistaken for a difference. Prints, per
kind, the median over rounds of ms per decoded token and of TTFT, and which sampler
functions the engine runs. Only the Engine's public API: the same file times an older
tree (PYTHONPATH=.base) for a before / after in one call.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from hybridgraph.bench.table import make_prompt
from hybridgraph.engine import Engine, SamplingParams


def _name(fn: object) -> str:
    return getattr(fn, "__qualname__", type(fn).__name__)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-3.2-1b")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    engine = Engine.load(args.model, device="cuda", dtype=args.dtype, mode="hybrid",
                         max_seq_len=512)
    prompt = make_prompt(10, engine.config.vocab_size)
    kinds = {"greedy": None,
             "sampled": SamplingParams(temperature=0.7, top_k=50, top_p=0.9, seed=1)}
    results: dict[str, list[tuple[float, float]]] = {k: [] for k in kinds}
    for r in range(args.rounds + 2):  # two warm-up rounds
        for kind, params in kinds.items():
            res = engine.generate(prompt, args.tokens, params, stop_ids=[])
            assert len(res.tokens) == args.tokens
            if r >= 2:
                results[kind].append((res.decode_ms_per_token, res.ttft_ms))
    print(f"{args.tag} {torch.cuda.get_device_name()} {args.model} {args.dtype}: kernels "
          f"{engine.stats()['kernels']}; samplers {_name(engine.ops.greedy)} / "
          f"{_name(engine.ops.sample)}")
    for kind, rows in results.items():
        per_token = statistics.median(r[0] for r in rows)
        ttft = statistics.median(r[1] for r in rows)
        print(f"{args.tag} {kind:8s} {per_token:.4f} ms/token (min "
              f"{min(r[0] for r in rows):.4f})  TTFT {ttft:.3f} ms  ({len(rows)} rounds of "
              f"{args.tokens} tokens)")


if __name__ == "__main__":
    main()
