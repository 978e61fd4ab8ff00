#!/usr/bin/env bash
# Round 3: the fused launch's registers (.vD: maxnreg=96) and O's early launch (attn0/attn1).
set -u
export PYTHONUNBUFFERED=1
P=default:pdl-late
for t in . .vD . .vD; do
  echo "== tree $t" | tee -a $OUT/round3.log
  (cd $t && PYTHONPATH=$PWD timeout 120 python3 $OLDPWD/$t/scripts/kernel_bench.py --sections decode --models llama-3.2-1b,tinyllama-1.1b \
    --decode-windows 512 --plans $P:fa0,$P:fa1,$P:fa0:attn0,$P:fa1:attn0 2>&1 | grep "^decode" | tee -a $OUT/round3.log)
done
