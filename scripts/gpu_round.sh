#!/usr/bin/env bash
# One GPU round on a lent machine, in one call: the GPU tests on this tree, then the benches
# asked for. Everything lands under $OUT (the device tool brings it back).
#   scripts/gpu_round.sh tests                      pytest -m gpu -> $OUT/gpu-tests.log
#   scripts/gpu_round.sh tests-split                pytest -m gpu as two shards, one GPU each
#                                                   (needs 2 GPUs; the multi-GPU tests skip as
#                                                   on one) -> $OUT/gpu-tests.log: 163 s of
#                                                   wall time on 2x H200 against ~470 s whole
#   scripts/gpu_round.sh tests-tp                   the multi-GPU tests only -> $OUT/tp-tests.log
#   scripts/gpu_round.sh tests-tp4                  only those needing 4 GPUs -> $OUT/tp4-tests.log
#   scripts/gpu_round.sh bench MODEL SUITES [ARGS]  hybridgraph bench -> $OUT/<TAG or model>.tgz
#                                                   (TAG=name keeps two runs of one model apart)
#   scripts/gpu_round.sh base-ablation              ablation of the tree in .base (a copy of
#                                                   an older commit) -> $OUT/base-ablation.tgz
#   scripts/gpu_round.sh bench-base MODEL SUITES [ARGS]
#                                                   hybridgraph bench of the tree in .base
#                                                   -> $OUT/base-<TAG or model>.tgz
#   scripts/gpu_round.sh forward MODEL [ARGS]       kernel_bench's prefill and decode sections
#                                                   (forward only, per plan) for the tree in
#                                                   .base, then this one -> $OUT/forward-*.json
#                                                   (ARGS: e.g. --decode-rows 4,16 --plans ...)
#   scripts/gpu_round.sh startup MODEL [MODE]       start-up to ready in fresh processes (the
#                                                   cost suite's child), cold then restart
#                                                   over compile caches of its own, for .base
#                                                   then this tree -> $OUT/startup.jsonl, and
#                                                   the Triton cubins each compiled, by kernel
#                                                   -> $OUT/startup-kernels-{base,new}.txt
#                                                   (RESTARTS=N: N restarts after the cold one)
#   scripts/gpu_round.sh allreduce N [ARGS]         all-reduce per call on N ranks, no model
#                                                   (scripts/allreduce_bench.py), for .base
#                                                   first if it exists, then this tree
# (The tool brings back at most 8 files: result folders travel as one tarball each.)
# Several steps: scripts/gpu_round.sh tests && scripts/gpu_round.sh bench llama-2-7b ablation
set -uo pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" /tmp/res
root=$(cd "$(dirname "$0")/.." && pwd)
case "${1:-}" in
  tests)
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu-tests.log"
    (cd "$root" && PYTHONPATH=$root${PYTHONPATH:+:$PYTHONPATH} python3 -m pytest -m gpu -q -p no:cacheprovider tests/gpu \
      2>&1 | tee -a "$OUT/gpu-tests.log" | tail -25) ;;
  tests-split)  # shards of about equal time (2x H200: 163 and 137 s); each sees one GPU
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu-tests.log"
    first="test_kernels.py test_launch.py test_oneshot.py test_parallel.py"
    rest=$(cd "$root/tests/gpu" && ls test_*.py | grep -vxF -f <(tr ' ' '\n' <<< "$first"))
    shards=("$first" "$(echo $rest)")
    for i in 0 1; do
      (cd "$root" && CUDA_VISIBLE_DEVICES=$i PYTHONPATH=$root${PYTHONPATH:+:$PYTHONPATH} \
        python3 -m pytest -m gpu -q -p no:cacheprovider --durations=12 \
        $(printf 'tests/gpu/%s ' ${shards[$i]}) > "/tmp/res/shard$i.log" 2>&1) &
    done
    wait
    for i in 0 1; do echo "== shard $i: ${shards[$i]}"; cat "/tmp/res/shard$i.log"; done >> "$OUT/gpu-tests.log"
    grep -E "^[0-9]+ passed|failed|error" /tmp/res/shard[01].log ;;
  tests-tp)  # never wrap it in `timeout`: the launcher passes SIGTERM on to rank 0
    nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/tp-tests.log"
    nvidia-smi topo -m | head -6 >> "$OUT/tp-tests.log"
    (cd "$root" && PYTHONPATH=$root${PYTHONPATH:+:$PYTHONPATH} python3 -m pytest -m gpu -q -rs -p no:cacheprovider \
      tests/gpu/test_parallel.py 2>&1 | tee -a "$OUT/tp-tests.log" | tail -25) ;;
  tests-tp4)  # only the tests that need 4 GPUs (the whole file took ~9 min on 2x H100)
    nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/tp4-tests.log"
    (cd "$root" && export PYTHONPATH=$root${PYTHONPATH:+:$PYTHONPATH} &&
      ids=$(python3 -m pytest -m gpu --collect-only -q -p no:cacheprovider tests/gpu/test_parallel.py 2>/dev/null | grep '\[4') &&
      python3 -m pytest -m gpu -q -rs -p no:cacheprovider $ids 2>&1 | tee -a "$OUT/tp4-tests.log" | tail -25) ;;
  bench)
    model=$2 suites=$3; shift 3
    tag=${TAG:-$model}
    (cd "$root" && PYTHONPATH=$root${PYTHONPATH:+:$PYTHONPATH} python3 -m hybridgraph.cli bench "$suites" --model "$model" \
      --out "/tmp/res/$model" "$@" 2>&1 | tee "/tmp/res/bench-$model.log" | grep -v "it/s\]" \
      | tail -40)
    tar czf "$OUT/$tag.tgz" -C /tmp/res "$model" "bench-$model.log"
    rm -rf "/tmp/res/$model" ;;
  bench-base)
    model=$2 suites=$3; shift 3
    tag=base-${TAG:-$model}
    (cd "$root/.base" && PYTHONPATH=$root/.base${PYTHONPATH:+:$PYTHONPATH} python3 -m hybridgraph.cli bench "$suites" \
      --model "$model" --out "/tmp/res/$tag" "$@" 2>&1 | tee "/tmp/res/bench-$tag.log" | grep -v "it/s\]" | tail -40)
    tar czf "$OUT/$tag.tgz" -C /tmp/res "$tag" "bench-$tag.log"
    rm -rf "/tmp/res/$tag" ;;
  base-ablation)
    (cd "$root/.base" && PYTHONPATH=$root/.base${PYTHONPATH:+:$PYTHONPATH} python3 -m hybridgraph.cli bench ablation \
      --model llama-2-7b --out /tmp/res/base-ablation 2>&1 | grep -v "it/s\]" | tail -30)
    tar czf "$OUT/base-ablation.tgz" -C /tmp/res base-ablation ;;
  forward)
    model=$2; shift 2
    for tree in base new; do
      dir=$root; [ $tree = base ] && dir=$root/.base
      [ -d "$dir/hybridgraph" ] || continue
      mkdir -p "/tmp/kb-$tree"
      (cd "$dir" && OUT=/tmp/kb-$tree PYTHONPATH=$dir${PYTHONPATH:+:$PYTHONPATH} python3 \
        scripts/kernel_bench.py --sections prefill,decode --models "$model" "$@" 2>&1 \
        | grep -v "it/s" > "$OUT/forward-$tree.txt")
      cp "/tmp/kb-$tree/kernel_bench.json" "$OUT/forward-$tree.json"
      echo "== $tree"; grep -E "^(prefill|decode) " "$OUT/forward-$tree.txt"
    done ;;
  startup)
    model=$2 mode=${3:-hybrid}
    for tree in base new; do
      dir=$root; [ $tree = base ] && dir=$root/.base
      [ -d "$dir/hybridgraph" ] || continue
      caches=$(mktemp -d)
      for start in cold $(yes restart | head -"${RESTARTS:-1}"); do
        (cd "$dir" && TRITON_CACHE_DIR=$caches/triton TORCHINDUCTOR_CACHE_DIR=$caches/inductor \
          PYTHONPATH=$dir${PYTHONPATH:+:$PYTHONPATH} python3 -m hybridgraph.bench.cost_child \
          --model "$model" --device cuda --dtype float16 --mode "$mode" --max-seq-len 512 \
          2>/dev/null | tail -1 | sed "s/^{/{\"tree\": \"$tree\", \"start\": \"$start\", /" \
          | tee -a "$OUT/startup.jsonl")
      done
      # What Triton compiled for this tree (one cubin a specialization), by kernel.
      find "$caches/triton" -name '*.cubin' -printf '%f\n' | sort | uniq -c | sort -rn \
        > "$OUT/startup-kernels-$tree.txt"
      echo "$tree: $(find "$caches/triton" -name '*.cubin' | wc -l) Triton cubins"
      rm -rf "$caches"
    done ;;
  allreduce)
    n=$2; shift 2
    for tree in base new; do
      dir=$root; [ $tree = base ] && dir=$root/.base
      [ -d "$dir/hybridgraph" ] || continue
      (cd "$root" && PYTHONPATH=$dir${PYTHONPATH:+:$PYTHONPATH} torchrun --nproc-per-node "$n" \
        scripts/allreduce_bench.py --tag "$tree" "$@" 2>&1 | grep -v "^W[0-9]" | tail -30)
    done ;;
  *) echo "usage: $0 tests | tests-tp | tests-tp4 | bench MODEL SUITES [ARGS] | bench-base MODEL SUITES [ARGS] | base-ablation | forward MODEL [ARGS] | allreduce N [ARGS]" >&2; exit 2 ;;
esac
