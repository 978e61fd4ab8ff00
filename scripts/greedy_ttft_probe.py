"""Does the prefill's greedy finish change TTFT? (issue 10, run 16)

    python scripts/greedy_ttft_probe.py [--model llama-2-7b] [--lengths 10,128] [--runs 60]

A prefill graph ends at the logits; the greedy sampler then runs outside it. One engine
(hybrid, Triton kernels where they pass), and its prefill finish swapped between: the
argmax kernel as installed (PDL), the same without PDL, Inductor's compiled argmax and
eager torch.argmax. The variants alternate over two rounds, so drift between processes
or over time is not mistaken for a difference. Prints median and min TTFT (ms, host ids
in -> token id on the host) per variant and prompt length.
"""

from __future__ import annotations

import statistics
from dataclasses import replace

import torch
from probe_common import probe_engine, probe_parser  # scripts/: beside this file

from hybridgraph.bench.table import make_prompt
from hybridgraph.kernels import argmax
from hybridgraph.runtime.dynamic import dynamic_ops


def main() -> None:
    args = probe_parser(lengths="10,128", runs=60).parse_args()
    engine = probe_engine(args.model)
    fast = engine.steps.fast
    if fast is None:
        raise SystemExit(f"the Triton kernels are not in use: {engine.steps.kernels_reason}")

    def no_pdl(logits: torch.Tensor, *unused: torch.Tensor) -> torch.Tensor:
        out = torch.empty(logits.shape[0], dtype=torch.int64, device=logits.device)
        return argmax.argmax(logits, out, fast.ws)

    installed = engine.runner.ops
    variants = {"kernel-pdl": installed, "kernel-nopdl": replace(installed, greedy=no_pdl),
                "compiled": dynamic_ops("compile"), "eager": dynamic_ops("eager")}
    print(torch.cuda.get_device_name(), "installed greedy:", installed.greedy)
    for rnd in range(2):
        for name, ops in variants.items():
            engine.runner.ops = ops  # only the prefill's finish reads it (decode is captured)
            for n in map(int, args.lengths.split(",")):
                prompt = make_prompt(n, engine.config.vocab_size)
                for _ in range(5):
                    engine.generate(prompt, 1, stop_ids=[])
                t = [engine.generate(prompt, 1, stop_ids=[]).ttft_ms for _ in range(args.runs)]
                print(rnd, name, n, "ttft median", round(statistics.median(t), 3),
                      "min", round(min(t), 3), flush=True)
    engine.runner.ops = installed


if __name__ == "__main__":
    main()
