#!/usr/bin/env bash
# Round 2: the spin's cost. Trees: . (atomic poll), .vB (atomic + nanosleep), .vC (volatile load poll).
set -u
export PYTHONUNBUFFERED=1
P=default:pdl-late
for t in . .vB .vC .; do
  echo "== tree $t" | tee -a $OUT/round2.log
  (cd $t && PYTHONPATH=$PWD timeout 120 python3 $OLDPWD/$t/scripts/kernel_bench.py --sections decode --models llama-3.2-1b,tinyllama-1.1b \
    --decode-windows 512 --plans $P:fa0,$P:fa1,$P:fa0:r2,$P:fa1:r2 2>&1 | grep "^decode" | tee -a $OUT/round2.log)
done
