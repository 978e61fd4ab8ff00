#!/usr/bin/env bash
# A/B of bench tp over trees given as args (dir names; "new" = repo root).
set -uo pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
R=$PWD; mkdir -p $OUT /tmp/res
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/gpus.txt
[ "$(nvidia-smi -L | wc -l)" -ge 2 ] || exit 3
for t in "$@"; do
  d=$R; [ "$t" = new ] || d=$R/$t
  s=$(date +%s)
  (cd $d && PYTHONPATH=$d python3 -m hybridgraph.cli bench tp --model llama-2-7b --tp 2 \
     --out /tmp/res/$t-$s > /tmp/res/$t-$s.log 2>&1)
  echo "== $t rc=$? $(( $(date +%s) - s )) s"
  grep -h "hybridgraph-hybrid-tp2 | 2 | [0-9]" /tmp/res/$t-$s/*/SUMMARY.md /tmp/res/$t-$s/SUMMARY.md 2>/dev/null | head -3
  tail -3 /tmp/res/$t-$s.log | cut -c1-300
done
tar czf $OUT/tpab.tgz -C /tmp/res .
