#!/usr/bin/env bash
set -uo pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
R=$PWD; mkdir -p $OUT /tmp/res
[ "$(nvidia-smi -L | wc -l)" -ge 2 ] || exit 3
for t in .base new .q new .base .q; do
  d=$R; [ "$t" = new ] || d=$R/$t
  s=$(date +%s)
  (cd $d && PYTHONPATH=$d python3 -m hybridgraph.cli bench tp --model llama-2-7b --tp 2 \
     --out /tmp/res/$t-$s > /tmp/res/$t-$s.log 2>&1)
  echo "== $t rc=$? $(( $(date +%s) - s )) s $(grep -h "hybridgraph-hybrid-tp2 | 2 | [0-9]" /tmp/res/$t-$s/SUMMARY.md | head -1 | cut -d'|' -f6-8,11-)"
done
tar czf $OUT/pf.tgz -C /tmp/res --exclude='*.log' .
