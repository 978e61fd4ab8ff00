"""Back-to-back 500-token prefills vs the same prefills 200 ms apart: TTFT, and the SM
clock and power nvidia-smi reads meanwhile (is the back-to-back slowdown the clock?)."""
import statistics, subprocess, sys, threading, time
import torch
from hybridgraph.bench.config import BenchConfig
from hybridgraph.bench.engines import Engines
from hybridgraph.bench.table import make_prompt

samples = []
stop = threading.Event()
def sample():
    while not stop.is_set():
        r = subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm,power.draw,temperature.gpu,clocks_throttle_reasons.active",
                            "--format=csv,noheader,nounits"], capture_output=True, text=True)
        samples.append((time.time(), r.stdout.strip()))
        time.sleep(0.05)

cfg = BenchConfig(model=sys.argv[1], device="cuda")
eng = Engines(cfg).get(cfg.default_mode)
print(torch.cuda.get_device_name(), flush=True)
for n in (10, 500):
    p = make_prompt(n, eng.config.vocab_size)
    for _ in range(5):
        eng.generate(p, 1, stop_ids=[])
threading.Thread(target=sample, daemon=True).start()
for n in (500, 10):
    p = make_prompt(n, eng.config.vocab_size)
    for gap in (0.0, 0.2, 0.0):
        t0 = time.time()
        ts = []
        for _ in range(40):
            ts.append(eng.generate(p, 1, stop_ids=[]).ttft_ms)
            if gap:
                time.sleep(gap)
        t1 = time.time()
        win = [s for t, s in samples if t0 <= t <= t1]
        print(f"len {n} gap {gap:.1f}s: ttft median {statistics.median(ts):.3f} ms  min {min(ts):.3f}  "
              f"p90 {sorted(ts)[35]:.3f}; nvidia-smi (MHz, W, C, reasons) {win[len(win)//2] if win else None} "
              f"| last {win[-1] if win else None}", flush=True)
stop.set()
