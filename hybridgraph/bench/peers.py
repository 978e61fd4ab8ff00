"""The `peers` suite: HF transformers generate (eager, and static cache with its compiled
decode), each in a child process, on the same shape, weights, prompts and device."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from hybridgraph.bench.config import BenchConfig
from hybridgraph.bench.engines import free_memory
from hybridgraph.bench.hw import floor_frac
from hybridgraph.bench.table import Table

IMPLS = ("eager", "static")


def run_peer(cfg: BenchConfig, impl: str, out: Path) -> dict:
    cmd = [sys.executable, "-m", "hybridgraph.bench.peer_child", "--model", cfg.model,
           "--device", cfg.device, "--dtype", cfg.dtype, "--impl", impl,
           "--lengths", ",".join(map(str, cfg.ttft_lengths)), "--runs", str(cfg.peer_runs),
           "--warmup", str(max(cfg.warmup, 1)), "--decode-prompt", str(cfg.decode_prompt),
           "--decode-new", str(cfg.decode_new), "--decode-runs", str(cfg.peer_decode_runs),
           "--max-cache-len", str(cfg.max_seq_len), "--out", str(out)]
    # stderr passes through: the child's progress bars show in the terminal.
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"peer {impl} exited with {proc.returncode}")
    return json.loads(out.read_text())


def peers_suite(cfg: BenchConfig, floor_ms: float) -> list[Table]:
    ttft = Table("peers_ttft", f"Peers: TTFT by prompt length ({cfg.peer_runs} runs each, "
                               "generate with max_new_tokens=1)",
                 ["system", "prompt_len", "runs", "median_ms", "mean_ms", "std_ms", "p99_ms",
                  "min_ms"])
    dec = Table("peers_decode", f"Peers: decode (prompt {cfg.decode_prompt}, {cfg.decode_new} "
                                "new tokens)",
                ["system", "compiled", "ms_per_token", "tokens_per_s", "floor_ms", "floor_frac",
                 "logit_rel_err"])
    with tempfile.TemporaryDirectory() as tmp:
        for impl in IMPLS:
            free_memory()
            r = run_peer(cfg, impl, Path(tmp) / f"{impl}.json")
            for n, s in r["ttft"].items():
                ttft.add(r["system"], int(n), s["n"], s["median"], s["mean"], s["std"],
                         s["p99"], s["min"])
            ms = r["decode_ms_per_token"]
            dec.add(r["system"], "yes" if r["compiled"] else "no", ms, 1e3 / ms, floor_ms,
                    floor_frac(ms, floor_ms), r["logit_rel_err"])
    dec.notes.append("ms_per_token = (median time of generate(new) - median time of "
                     "generate(1)) / (new - 1): HF without per-token streaming, its best case. "
                     "logit_rel_err: |HF - hybridgraph| / |hybridgraph| logits on one prompt "
                     "with the copied weights (same weights check).")
    if not cfg.is_cuda:
        dec.notes.append("On the CPU transformers does not compile the static-cache decode "
                         "(it auto-compiles on CUDA only): hf-static ran uncompiled here.")
    return [ttft, dec]
