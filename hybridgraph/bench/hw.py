"""What the numbers ran on, and the two hardware ceilings measured in the same run:
copy bandwidth (the floor of decode) and matmul rate."""

from __future__ import annotations

import datetime
import importlib.metadata
import platform
import subprocess
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from hybridgraph.model.config import ModelConfig


def _version(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _driver() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown (nvidia-smi failed)"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU: {_cpu_name()} ({torch.get_num_threads()} threads)"


def slug(text: str) -> str:
    """A name safe as a directory: 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    out = "".join(c.lower() if c.isalnum() else "-" for c in text)
    return "-".join(p for p in out.split("-") if p) or "unknown"


def _time_ms(fn: Callable[[], Any], device: torch.device, iters: int) -> float:
    """Median milliseconds of fn over iters runs after warm-up (device events on CUDA)."""
    for _ in range(3):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


def copy_bandwidth(device: torch.device, nbytes: int | None = None, iters: int = 20,
                   rounds: int = 5) -> float:
    """Bytes read plus bytes written per second by a large device-to-device copy: the best
    of `rounds` medians, each over buffers of its own. One median of one pair of buffers
    read 2884-2977 GB/s on one H100 from run to run (KERNELS.md run 28), and the decode
    floor, hence every floor_frac, moved with it; slowness only ever lowers a reading, so
    the best of several is the ceiling's estimate."""
    if nbytes is None:
        # Far larger than any cache (H100 L2 is 50 MB), so this is DRAM bandwidth.
        nbytes = (1 << 30) if device.type == "cuda" else (128 << 20)
    best = 0.0
    for _ in range(rounds if device.type == "cuda" else 1):
        src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
        dst = torch.empty_like(src)
        ms = _time_ms(lambda src=src, dst=dst: dst.copy_(src), device, iters)
        best = max(best, 2 * nbytes / (ms / 1e3))
        del src, dst
    return best


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int | None = None,
                iters: int = 20) -> float:
    """Floating-point operations per second of an n x n x n matmul (random data, not zeros:
    zeros can run faster than real weights)."""
    if device.type != "cuda" and dtype != torch.float32:
        dtype = torch.float32   # half-precision matmul on CPU is not what the CPU run uses
    n = n or (8192 if device.type == "cuda" else 1024)
    # Two input sets in turn, so no run finds the previous one's operands in cache.
    sets = [(torch.randn(n, n, device=device, dtype=dtype),
             torch.randn(n, n, device=device, dtype=dtype)) for _ in range(2)]
    state = {"i": 0}

    def step() -> None:
        a, b = sets[state["i"] % 2]
        state["i"] += 1
        torch.mm(a, b)

    ms = _time_ms(step, device, iters)
    return 2 * n**3 / (ms / 1e3)


def weight_bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
    """Bytes of weights one decode step must read: every matrix once, but only one row of
    the embedding table (unless it is tied to the output head, which reads it all)."""
    params = config.num_params()
    if not config.tie_word_embeddings:
        params -= config.vocab_size * config.hidden_size
    return params * torch.tensor([], dtype=dtype).element_size()


def collect(device: torch.device, dtype: torch.dtype, config: ModelConfig) -> dict[str, Any]:
    """Metadata every result file records, including the ceilings measured now."""
    bw = copy_bandwidth(device)
    rate = matmul_rate(device, dtype)
    wbytes = weight_bytes_per_token(config, dtype)
    is_cuda = device.type == "cuda"
    shape = (f"{config.name}: {config.num_layers} layers, hidden {config.hidden_size}, "
             f"ffn {config.intermediate_size}, heads {config.num_heads}/{config.num_kv_heads} kv, "
             f"vocab {config.vocab_size}, {config.num_params() / 1e6:.1f}M params")
    return {
        "device": device_name(device),
        "device_slug": slug(torch.cuda.get_device_name(device)) if is_cuda else "cpu",
        "driver": _driver() if is_cuda else "n/a (CPU run)",
        "cuda": torch.version.cuda or "n/a (CPU build)",
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "python": platform.python_version(),
        "dtype": str(dtype).removeprefix("torch."),
        "model": config.name,
        "model_shape": shape,
        "params": config.num_params(),
        "copy_bandwidth_gbs": bw / 1e9,
        "matmul_tflops": rate / 1e12,
        "matmul_dtype": str(dtype if is_cuda else torch.float32).removeprefix("torch."),
        "weight_bytes_per_token": wbytes,
        "decode_floor_ms": wbytes / bw * 1e3,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def floor_frac(measured_ms: float, floor_ms: float) -> float:
    """floor / measured: 1.0 means the step ran at the copy-bandwidth floor."""
    return floor_ms / measured_ms if measured_ms > 0 else float("nan")
