"""Tensor parallelism over the GPUs of one host (gloo on CPUs): docs/DESIGN.md.

group.py (process group, bounded timeouts, --tp checks), shard.py (who holds which
slice), load.py (per-rank loading), control.py (rank 0 leads, the others follow),
engine.py (a rank's engine), launch.py (N rank processes and their watchdog),
allreduce.py (NCCL vs symmetric-memory timing for the bench).
"""
