"""Triton's interpreter for the CPU tests of the kernels (test_kernels.py, test_oneshot.py)
and of the decode blocks on them (test_fast_decode.py), and the helpers they use.

Without a GPU the kernels run in the interpreter (TRITON_INTERPRET=1, set before they are
imported; on a CUDA machine tests/gpu covers them compiled). Float16 only: the
interpreter computes bfloat16 wrongly (its tl.dot and arithmetic on bf16 gave garbage with
triton 3.9), so bf16 is checked on the GPU. Tolerance: TOLERANCE[float16] against float32.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import threading
import time

import pytest
import torch

from hybridgraph.kernels.selfcheck import TOLERANCE
from hybridgraph.model.config import ModelConfig

# tests/conftest.py sets TRITON_INTERPRET=1 on a machine without CUDA before any test
# module loads; here it is only read, so the kernel tests skip rather than run compiled.
INTERPRET = (importlib.util.find_spec("triton") is not None and not torch.cuda.is_available()
             and os.environ.get("TRITON_INTERPRET") == "1")

needs_interpreter = pytest.mark.skipif(
    not INTERPRET, reason="needs triton and no GPU (tests/gpu covers the kernels compiled)")
F16 = torch.float16
TOL = TOLERANCE[F16]
# A model the interpreter runs in seconds: GQA (4 heads over 2), head dim 32.
SMALL = ModelConfig(vocab_size=97, hidden_size=128, intermediate_size=96, num_layers=2,
                    num_heads=4, num_kv_heads=2, max_position_embeddings=512, name="t")


# Compiles kernels with Triton's real compiler for sm_90 in a fresh process (the
# interpreter is on in this one): ptxas ships with triton, no GPU is needed. Prints, per
# variant, how many warpgroup (Hopper) and mma.sync (Ampere) MMA instructions it got.
_COMPILE = """
import json, re, sys, importlib
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
module, kernel, variants = json.loads(sys.argv[1])
fn = getattr(importlib.import_module(module), kernel)
mmas = []
for signature, constexprs, options in variants:
    sig = dict(signature, **{name: "constexpr" for name in constexprs})
    k = triton.compile(ASTSource(fn, sig, constexprs=constexprs),
                       target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, **options))
    ptx = k.asm["ptx"]
    mmas.append([len(re.findall("wgmma.mma_async", ptx)), len(re.findall("mma.sync", ptx))])
print(json.dumps(mmas))
"""


def compile_for_hopper(module: str, kernel: str,
                       variants: list[tuple[dict[str, str], dict, dict]]
                       ) -> tuple[str, list[tuple[int, int]]]:
    """Compiles `module.kernel` for sm_90 for each (signature: argument -> type such as
    "*fp16" or "i32"; constexprs: argument -> value; options: num_warps, num_stages) in
    `variants`. Returns ('', [(warpgroup MMAs, mma.sync) per variant]) or the compiler's
    error and []. The interpreter runs a kernel as Python and accepts what the compiler
    refuses (a global that is not constexpr, a return inside a constexpr `if`)."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    args = json.dumps([module, kernel, variants])
    r = subprocess.run([sys.executable, "-c", _COMPILE, args], env=env, capture_output=True,
                       text=True, timeout=600)
    if r.returncode != 0:
        return r.stderr[-4000:] or "compiler exited with no message", []
    return "", [tuple(m) for m in json.loads(r.stdout.strip().splitlines()[-1])]


def rnd(*shape: int, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape) * scale).to(F16)


def nan(*shape: int) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=F16)


def only_written(before: torch.Tensor, after: torch.Tensor, rows, pos) -> bool:
    """after equals before everywhere but cache[rows[i], :, pos[i]]."""
    restored = after.clone()
    restored[rows, :, pos] = before[rows, :, pos]
    return torch.equal(restored, before)


def snapshot_caches(model) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Copies of every layer's KV cache, to compare two paths that write the same rows."""
    return [(c.k.clone(), c.v.clone()) for c in model.caches]


def restore_caches(model, snap: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for c, (k, v) in zip(model.caches, snap, strict=True):
        c.k.copy_(k)
        c.v.copy_(v)


def _any_empty(region: torch.Tensor, element_size: int) -> bool:
    """Whether any element (of that size) of a byte region still reads as EMPTY."""
    if element_size == 4:
        return bool((region.view(torch.int32) == -2147450880).any())
    return bool((region.view(torch.int16) == -32768).any())


class HostRanks:
    """`world` ranks' symmetric buffers in host memory, for the one-shot all-reduce in the
    interpreter (tests/test_oneshot.py, tests/test_parallel_symm.py).

    The interpreter runs one launch at a time and its programs one after another, so the
    ranks cannot all run the kernel at once: `run` runs ONE rank's launch while a thread
    plays every peer as a GPU peer behaves: each call it pushes its part into the rank's
    buffer (after `delay_s`), then waits for the rank's push to land in its own buffer,
    records it and empties the slot again (as its kernel would after reading it) before
    its next call. The kernel's own pushes, polls and clears run for real, on real memory.
    """

    def __init__(self, world: int, message_bytes: int, delay_s: float = 0.0) -> None:
        from hybridgraph.kernels import oneshot
        self.world, self.delay_s = world, delay_s
        nbytes = oneshot.buffer_bytes_for(message_bytes, world)
        self.buffers = [oneshot.clear(torch.empty(nbytes, dtype=torch.uint8))
                        for _ in range(world)]
        self.buffer_ptrs = torch.tensor([b.data_ptr() for b in self.buffers], dtype=torch.int64)
        self.states = [torch.zeros(2, dtype=torch.int32) for _ in range(world)]
        self.slot = oneshot.slot_bytes(nbytes, world)
        self.received: list[dict[int, torch.Tensor]] = []  # per call: peer -> what landed

    def slot_view(self, owner: int, phase: int, src: int, nbytes: int) -> torch.Tensor:
        """Bytes [0, nbytes) of slot `src` of `phase` in rank `owner`'s buffer."""
        at = (phase * self.world + src) * self.slot
        return self.buffers[owner][at:at + nbytes]

    def all_empty(self) -> bool:
        return all(bool((b[:b.numel() // 2 * 2].view(torch.int16) == -32768).all())
                   for b in self.buffers)

    def _play_peers(self, rank: int, parts: list[torch.Tensor], calls: int,
                    deadline: float) -> None:
        nbytes = parts[0].numel() * parts[0].element_size()
        phase = int(self.states[rank][0])
        for _ in range(calls):
            time.sleep(self.delay_s)
            for p in range(self.world):   # peer p pushes its part into the rank's buffer
                if p != rank:
                    self.slot_view(rank, phase, p, nbytes).view(parts[p].dtype).copy_(
                        parts[p].reshape(-1))
            got = {}
            for p in range(self.world):   # and waits for the rank's push to land
                if p == rank:
                    continue
                dst = self.slot_view(p, phase, rank, nbytes)
                while _any_empty(dst, parts[0].element_size()):
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"rank {rank}'s push never reached peer {p}")
                    time.sleep(0.0002)
                got[p] = dst.view(parts[0].dtype).clone()
                dst[:nbytes // 2 * 2].view(torch.int16).fill_(-32768)   # read: empty again
            self.received.append(got)
            phase ^= 1

    def run(self, rank: int, parts: list[torch.Tensor], launch, calls: int = 1,
            timeout_s: float = 120.0):
        """launch() as rank `rank` (it makes `calls` kernel calls on `parts[rank]`'s shape)
        with its peers played; its result. A call that never completes fails here within
        timeout_s instead of hanging the test run."""
        deadline = time.monotonic() + timeout_s
        result: dict = {}

        def main() -> None:
            try:
                result["out"] = launch()
            except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
                result["error"] = e

        def peers() -> None:
            try:
                self._play_peers(rank, parts, calls, deadline)
            except BaseException as e:  # noqa: BLE001
                result["peer_error"] = e

        threads = [threading.Thread(target=f, daemon=True) for f in (peers, main)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        if any(t.is_alive() for t in threads):
            raise TimeoutError(f"rank {rank}'s all-reduce did not complete in {timeout_s} s")
        for key in ("error", "peer_error"):
            if key in result:
                raise result[key]
        return result["out"]
