"""The GPU's SM clock, and what holds it down, while a suite runs (read by nvidia-smi).

Long prefills keep the tensor cores busy enough that, run back to back, the card's power
management lowers the SM clock to stay under its power limit: on an H200, 500-token
llama-2-7b prefills one after another ran at ~1480 MHz ("sw power cap") against 1980 MHz
with 0.2 s idle between them, and took 12.4 against 11.0 ms (docs/KERNELS.md run 35).
The TTFT tables carry the clock each row ran at, so such a row says what held it.

One `nvidia-smi --query-gpu ... --loop-ms=N` process streams the samples for the whole
suite, so the host spawns nothing between prompts; a thread stamps each line as it
arrives.
"""

from __future__ import annotations

import statistics
import subprocess
import threading
import time
from types import TracebackType

import torch

# nvidia-smi's clocks_throttle_reasons bits (NVML's nvmlClocksEventReasons).
# (0x1, idle, is no cap on a run and is left out.)
REASONS = {0x2: "application clocks", 0x4: "sw power cap", 0x8: "hw slowdown",
           0x20: "sw thermal", 0x40: "hw thermal", 0x80: "hw power brake"}


def parse(line: str) -> tuple[float, int] | None:
    """'1470, 0x0000000000000004' (MHz, reasons) -> (1470.0, 4); None if unreadable."""
    parts = [p.strip() for p in line.split(",")]
    if len(parts) != 2:
        return None
    try:
        return float(parts[0]), int(parts[1], 16)
    except ValueError:
        return None


def reasons_text(masks: list[int]) -> str:
    """The caps named in a row's samples' reasons, each with the share of samples it was
    active in ('sw power cap 85%'), 'none' if none (idle and unknown bits aside). A cap
    seen in one sample may be the tail of the row before."""
    shares = [(name, sum(1 for m in masks if m & bit) / len(masks))
              for bit, name in REASONS.items()] if masks else []
    named = [f"{name} {share:.0%}" for name, share in shares if share > 0]
    return " + ".join(named) if named else "none"


class ClockLog:
    """SM clock samples of `device` every `interval_ms`, for `between(t0, t1)` (times from
    `now()`). Without CUDA or nvidia-smi it records nothing and says so."""

    def __init__(self, device: torch.device, interval_ms: int = 100) -> None:
        self.samples: list[tuple[float, float, int]] = []  # (monotonic s, MHz, reasons)
        self._proc: subprocess.Popen[str] | None = None
        self.why_none = "n/a (no GPU)"
        if device.type != "cuda":
            return
        cmd = ["nvidia-smi", "--query-gpu=clocks.sm,clocks_throttle_reasons.active",
               "--format=csv,noheader,nounits", f"--loop-ms={interval_ms}"]
        uuid = getattr(torch.cuda.get_device_properties(device), "uuid", None)
        if uuid is not None:  # this process's device, whatever CUDA_VISIBLE_DEVICES says
            uuid = str(uuid)
            cmd.append(f"--id={uuid if uuid.startswith('GPU-') else 'GPU-' + uuid}")
        try:
            self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE,
                                          stderr=subprocess.DEVNULL, text=True)
        except OSError:
            self.why_none = "n/a (nvidia-smi failed)"
            return
        self.why_none = "n/a (no sample)"
        threading.Thread(target=self._read, daemon=True, name="clock-log").start()

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            got = parse(line)
            if got is not None:
                self.samples.append((time.monotonic(), *got))

    @staticmethod
    def now() -> float:
        return time.monotonic()

    def between(self, t0: float, t1: float) -> tuple[float | str, str]:
        """(median SM MHz, the caps seen) over the samples taken in [t0, t1], or a reason
        there are none."""
        got = [(mhz, why) for t, mhz, why in self.samples if t0 <= t <= t1]
        if not got:
            return self.why_none, self.why_none
        return statistics.median(mhz for mhz, _ in got), reasons_text([w for _, w in got])

    def close(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
            self._proc = None

    def __enter__(self) -> ClockLog:
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
