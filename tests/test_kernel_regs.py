"""scripts/kernel_regs.py end to end, in a fresh process (the interpreter is on in this one):
every launch of a one-row step is recorded, specialized as the JIT would and compiled for
sm_90, and its resources read back."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.triton_interpreter import needs_interpreter

ROOT = Path(__file__).resolve().parents[1]


@needs_interpreter  # a Triton with its CUDA compiler (and the cuobjdump it ships)
def test_kernel_regs_reports_each_launch_of_a_step() -> None:
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "kernel_regs.py"), "--models",
                        "llama-3.2-1b", "--block-t", "64", "--attn-warps", "4"],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = re.findall(r"^llama-3.2-1b\s+(.+?)\s+regs\s+(\d+)\s+stack\s+(\d+)\s+shared\s+(\d+)"
                      r"\s+mma_waits\s+(\d+)$", r.stdout, re.MULTILINE)
    labels = [label for label, *_ in rows]
    # One row runs on the register path: no warpgroup products anywhere.
    assert all(w == "0" for *_, w in rows), r.stdout
    assert labels == ["gemv qkv", "attention block_t 64 warps 4 early_kv", "gemv wo",
                      "ffn (gate/up + down)", "gemv head", "argmax"], r.stdout
    regs = {label: int(n) for label, n, *_ in rows}
    assert all(0 < n <= 255 for n in regs.values())
    # Specialized as on a GPU (16-byte loads), the one-row O GEMV needs no more than the
    # fused feed-forward, whose one launch holds both of its GEMVs' registers.
    assert regs["gemv wo"] <= regs["ffn (gate/up + down)"]
