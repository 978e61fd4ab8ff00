set -u
n=$(nvidia-smi --query-gpu=name --format=csv,noheader|head -1); case "$n" in *H100*) ;; *) echo "not H100: $n"; exit 3;; esac
echo "commit b18ff17 vs base 911dc1e"
export PYTHONPATH=$PWD NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
for m in tinyllama-1.1b llama-3.2-1b; do
  TAG=base-$m bash scripts/gpu_round.sh bench-base $m decode --dtype bfloat16 | grep -iE "ms/token|floor|decode" | head -8
  TAG=new-$m bash scripts/gpu_round.sh bench $m decode --dtype bfloat16 | grep -iE "ms/token|floor|decode" | head -8
done
python3 scripts/step_probe.py --models tinyllama-1.1b 2>&1 | tail -25 | tee $OUT/step-probe.txt
