#!/usr/bin/env bash
set -uo pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
R=$PWD; mkdir -p $OUT /tmp/res
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/gpus.txt
[ "$(nvidia-smi -L | wc -l)" -ge 2 ] || exit 3
kb() {  # tree tag
  d=$R; [ "$1" = new ] || d=$R/$1
  s=$(date +%s)
  (cd $d && CUDA_VISIBLE_DEVICES=0 OUT=/tmp/kb-$2 PYTHONPATH=$d python3 scripts/kernel_bench.py \
     --sections prefill,decode --models llama-3.2-1b,tinyllama-1.1b --decode-rows 16 \
     --plans default:pdl-late --prefill-plans default:pdl-late --prefill-tokens 10,16 2>&1 \
     | grep -v "it/s" > $OUT/kb-$2.txt)
  echo "== kb $2 $(( $(date +%s) - s )) s"; grep -h '^{' $OUT/kb-$2.txt | tr -d '\000' | cut -c1-160
}
tp() {
  d=$R; [ "$1" = new ] || d=$R/$1
  s=$(date +%s)
  (cd $d && PYTHONPATH=$d python3 -m hybridgraph.cli bench tp --model llama-2-7b --tp 2 \
     --out /tmp/res/tp-$2 > /tmp/res/tp-$2.log 2>&1)
  echo "== tp $2 rc=$? $(( $(date +%s) - s )) s"
  grep -h "hybridgraph-hybrid-tp2 | 2 | [0-9]" $(find /tmp/res/tp-$2 -name SUMMARY.md) | head -3
}
kb .base base1; kb new new1
tp .base base1; tp new new1; tp .base base2; tp new new2
kb .base base2; kb new new2
tar czf $OUT/abA.tgz -C /tmp/res .
