#!/usr/bin/env bash
set -uo pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
R=$PWD; mkdir -p $OUT /tmp/res
[ "$(nvidia-smi -L | wc -l)" -ge 2 ] || exit 3
git log --oneline 2>/dev/null | head -1
s=$(date +%s)
bash scripts/gpu_round.sh tests-split
echo "split: $(( $(date +%s) - s )) s"
(PYTHONPATH=$R python3 -m pytest -m gpu -q -rs -p no:cacheprovider tests/gpu/test_oneshot.py 2>&1 | tail -3) | tee $OUT/oneshot-tests.log
echo "oneshot: $(( $(date +%s) - s )) s"
for i in 1 2; do
  (PYTHONPATH=$R python3 -m hybridgraph.cli bench tp --model llama-2-7b --tp 2 --out /tmp/res/tp-$i > /tmp/res/tp-$i.log 2>&1)
  grep -h "hybridgraph-hybrid-tp2 | 2 | [0-9]" $(find /tmp/res/tp-$i -name SUMMARY.md) | head -3
done
tar czf $OUT/tpB.tgz -C /tmp/res tp-1 tp-2
echo "total: $(( $(date +%s) - s )) s"
