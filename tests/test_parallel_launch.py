"""The launcher's watchdog: a rank that fails stops the others, with an error naming it."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from hybridgraph.parallel.launch import RankFailed, launch, rank_env, watch


def _py(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code])


def test_a_failing_rank_stops_the_others() -> None:
    sleeper = _py("import time; time.sleep(120)")
    procs = [sleeper, _py("import sys; sys.exit(3)")]
    t0 = time.monotonic()
    with pytest.raises(RankFailed, match="rank 1 of 2 stopped with exit status 3"):
        watch(procs)
    assert time.monotonic() - t0 < 30
    assert sleeper.poll() is not None          # stopped, not left behind


def test_a_killed_rank_is_named_by_its_signal() -> None:
    victim = _py("import time; time.sleep(120)")
    procs = [_py("import time; time.sleep(120)"), victim]
    victim.send_signal(signal.SIGKILL)
    with pytest.raises(RankFailed, match="rank 1 of 2 stopped with signal SIGKILL"):
        watch(procs)
    assert all(p.poll() is not None for p in procs)


def test_followers_must_exit_after_rank_0() -> None:
    procs = [_py("pass"), _py("import time; time.sleep(120)")]
    with pytest.raises(RankFailed, match=r"rank 0 finished but ranks \[1\] did not exit"):
        watch(procs, follower_exit_s=1.0)
    assert procs[1].poll() is not None


def test_clean_ranks_return_0() -> None:
    assert launch(2, ["-c", "import os; assert os.environ['NCCL_NVLS_ENABLE'] == '0'"]) == 0


def test_rank_env_is_torchruns_with_multicast_off() -> None:
    env = rank_env(3, 4, 29500, {"NCCL_NVLS_ENABLE": "1"})
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["MASTER_PORT"]) == \
        ("3", "4", "3", "29500")
    assert env["NCCL_NVLS_ENABLE"] == "0" and env["TORCH_SYMM_MEM_DISABLE_MULTICAST"] == "1"
