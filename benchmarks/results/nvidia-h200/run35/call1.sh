#!/usr/bin/env bash
# Round 1: the new kernel's GPU tests, then the forward A/B (fused QKV+attention or not).
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,power.draw --format=csv,noheader | tee $OUT/round1.log
timeout 240 python3 -m pytest -m gpu -q -x -p no:cacheprovider tests/gpu/test_qkv_attention.py 2>&1 | tail -15 | tee -a $OUT/round1.log
P=default:pdl-late
for i in 1 2; do
  timeout 150 python3 scripts/kernel_bench.py --sections floor,decode --models llama-3.2-1b,tinyllama-1.1b \
    --decode-windows 512,2048 --plans $P:fa0,$P:fa1,$P:fa0:r2,$P:fa1:r2 2>&1 | grep -v "^#" | tail -22 | tee -a $OUT/round1.log
done
