"""Tensor parallelism on the CPU over gloo: N rank processes give the one-rank results.

Each check starts real rank processes (tests/tp_worker.py, or the CLI) through the
launcher, so it covers the process group, per-rank loading, the all-reduce hook and the
leader/follower protocol together. Float32: logits agree to rounding (the sums run in
another order), greedy and seeded-sampled tokens exactly.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hybridgraph.cli import main
from hybridgraph.engine import Engine
from hybridgraph.engine_config import EngineConfig
from hybridgraph.model.config import preset
from hybridgraph.model.loader import load_model, random_model
from hybridgraph.model.tokenizer import load_tokenizer
from hybridgraph.parallel.launch import free_port, launch, rank_env, stop_all
from tests.conftest import TINY, make_hf_checkpoint, rel_max_diff
from tests.tp_worker import generate, logits

ROOT = Path(__file__).resolve().parents[1]
# 16 query heads over 8 KV heads (GQA), ffn 64: every count divides by 8 (issue 15).
EIGHT = replace(TINY, hidden_size=128, num_heads=16, num_kv_heads=8, intermediate_size=64,
                name="eight")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _one_rank(source: str, seed: int = 3):
    if source == "tiny":
        cfg = preset("tiny")
        model = random_model(cfg, torch.device("cpu"), torch.float32, seed=seed)
        return model, load_tokenizer(None, cfg.bos_token_id, cfg.eos_token_ids)
    return load_model(source)


def _check(out: Path, source: str) -> None:
    model, tok = _one_rank(source)
    want = logits(model)
    got = load_file(str(out / f"{Path(source).name}.safetensors"))
    for name in got:   # eager, and (tiny) hybrid mode's compiled blocks
        ref = want[name.removesuffix("_compiled")]
        assert got[name].shape == ref.shape
        assert rel_max_diff(got[name], ref) < 1e-5, name
        assert torch.equal(got[name].argmax(-1), ref.argmax(-1)), name
    engine = Engine(model, tok, EngineConfig(mode="eager", max_batch=2, max_seq_len=32))
    tokens = json.loads((out / f"{Path(source).name}.json").read_text())
    assert tokens == generate(engine)


def test_two_ranks_match_one(tmp_path: Path, gqa_checkpoint) -> None:
    directory, _ = gqa_checkpoint
    assert launch(2, ["-m", "tests.tp_worker", str(tmp_path), "tiny", str(directory)],
                  env=_env()) == 0
    assert "decode_compiled" in load_file(str(tmp_path / "tiny.safetensors"))
    _check(tmp_path, "tiny")           # random preset: each rank draws its own slices
    _check(tmp_path, str(directory))   # safetensors: each rank reads its own slices


def test_eight_ranks_match_one(tmp_path: Path) -> None:
    directory = tmp_path / "eight"
    make_hf_checkpoint(EIGHT, directory, seed=2)
    out = tmp_path / "out"
    out.mkdir()
    assert launch(8, ["-m", "tests.tp_worker", str(out), str(directory)], env=_env()) == 0
    _check(out, str(directory))


def _cli(*args: str) -> list[str]:
    out = subprocess.run([sys.executable, *args], env=_env(), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.splitlines()


GENERATE = ["generate", "--model", "tiny", "--prompt-ids", "5,17,42", "--max-new-tokens", "6"]


def test_generate_cli_with_tp_2_prints_the_one_rank_text() -> None:
    one = _cli("-m", "hybridgraph.cli", *GENERATE)
    # --allreduce reaches every rank; CPU ranks sum over gloo whatever it asks.
    two = _cli("-m", "hybridgraph.cli", *GENERATE, "--tp", "2", "--allreduce", "symm_mem")
    assert two[0] == one[0]            # the generated text
    assert "tp 2] prompt 3 tokens, 6 new" in two[1]


def test_chat_with_tp_2_answers_like_one_rank() -> None:
    """The interactive chat on rank 0, reading stdin; the follower exits with it."""
    argv = ["-m", "hybridgraph.cli", "chat", "--model", "tiny", "--max-new-tokens", "5",
            "--chat-template", "{% for m in messages %}{{ m.content }}{% endfor %}"]
    runs = [subprocess.run([sys.executable, *argv, *tp], env=_env(), input="hello\n",
                           capture_output=True, text=True, timeout=300) for tp in ([], ["--tp", "2"])]
    for r in runs:
        assert r.returncode == 0, r.stderr[-3000:]
    assert runs[1].stdout == runs[0].stdout


def test_the_same_command_runs_under_torchrun() -> None:
    argv = GENERATE
    # --standalone: a rendezvous on a free port (the default 29500 may be taken).
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", "-m", "hybridgraph.cli", *argv, "--tp", "2"]
    one = subprocess.run([sys.executable, "-m", "hybridgraph.cli", *argv], env=_env(),
                         capture_output=True, text=True, timeout=300, check=True)
    two = subprocess.run(run, env=_env(), capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.splitlines()[0] == one.stdout.splitlines()[0]
    assert "tp 2] prompt 3 tokens" in two.stdout


@pytest.mark.parametrize(("tp", "message"), [("0", "tp must be an integer >= 1, got 0"),
                                             ("3", "tp 3 does not divide tiny's num_heads (4)")])
def test_bad_tp_is_refused(tp: str, message: str, capsys: pytest.CaptureFixture) -> None:
    assert main(["generate", "--model", "tiny", "--tp", tp]) == 2
    assert message in capsys.readouterr().err


def _start_looping(tmp_path: Path, env: dict[str, str]) -> list[subprocess.Popen]:
    """Two ranks generating in a loop (tests/tp_worker.py --loop), once they are at it."""
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "tests.tp_worker", str(tmp_path),
                               "--loop"], env=rank_env(r, 2, port, env),
                              stderr=subprocess.DEVNULL) for r in range(2)]
    deadline = time.monotonic() + 120
    while not (tmp_path / "looping").exists():
        assert time.monotonic() < deadline, "ranks never started generating"
        assert all(p.poll() is None for p in procs), [p.returncode for p in procs]
        time.sleep(0.2)
    return procs


@pytest.mark.parametrize("victim", [0, 1])
def test_a_killed_rank_brings_the_group_down(tmp_path: Path, victim: int) -> None:
    """Kill one rank mid-generation: the other fails by itself (no watchdog involved),
    with an error, within a bounded time, instead of waiting forever."""
    procs = _start_looping(tmp_path, _env())
    try:
        procs[victim].send_signal(signal.SIGKILL)
        survivor = procs[1 - victim]
        assert survivor.wait(timeout=60) != 0
    finally:
        stop_all(procs)


def test_a_hung_leader_times_the_follower_out(tmp_path: Path) -> None:
    """A leader that stops (SIGSTOP: alive, sockets open, silent) is noticed through the
    timeouts alone: the follower exits with an error within about the control timeout."""
    env = {**_env(), "HG_TP_CONTROL_TIMEOUT_S": "4", "HG_TP_TIMEOUT_S": "4"}
    procs = _start_looping(tmp_path, env)
    try:
        procs[0].send_signal(signal.SIGSTOP)
        t0 = time.monotonic()
        assert procs[1].wait(timeout=60) != 0
        assert time.monotonic() - t0 < 30
    finally:
        procs[0].send_signal(signal.SIGCONT)
        stop_all(procs)


def test_an_idle_leader_keeps_the_followers(tmp_path: Path) -> None:
    """Idle for twice the control timeout: the heartbeats keep the follower waiting."""
    env = {**_env(), "HG_TP_CONTROL_TIMEOUT_S": "3"}
    assert launch(2, ["-m", "tests.tp_worker", str(tmp_path), "--idle", "6"], env=env) == 0
    assert (tmp_path / "idle-ok").exists()


def test_serve_with_tp_2(tmp_path: Path) -> None:
    """The socket server on rank 0, one follower: a request gets the one-rank tokens, and
    SIGTERM to the launcher drains rank 0, which releases the follower: all exit 0."""
    from hybridgraph.server.client import Client
    from hybridgraph.server.launch import ServerProcess

    model, tok = _one_rank("tiny", seed=0)   # serve's default weights seed
    want = Engine(model, tok, EngineConfig(mode="eager", max_seq_len=64)).generate(
        [5, 17, 42], 6).tokens
    sock = str(tmp_path / "tp.sock")
    srv = ServerProcess(sock, extra=["--tp", "2", "--device", "cpu", "--max-seq-len", "64"],
                        env=_env())
    with srv:
        with Client(sock) as client:
            reply = client.generate(prompt_ids=[5, 17, 42], max_new_tokens=6, seed=0)
            status = client.status()
            assert status["tp"] == 2
            # The engine says which all-reduce it uses and why (gloo: CPU ranks).
            assert status["allreduce"] == "gloo" and "CPU" in status["allreduce_reason"]
        assert reply["tokens"] == want
    assert srv.proc is not None and srv.proc.returncode == 0, srv.log()


def test_leader_exit_releases_the_followers_then_closes_the_group() -> None:
    """The atexit handler: STOP first (even when a follower is gone already), then the
    group is closed before the interpreter's teardown can destroy it live."""
    import threading

    from hybridgraph.parallel.control import _stop_quietly

    events: list[str] = []

    class Group:
        def close(self) -> None:
            events.append("close")

    class Leader:
        heartbeat_s, group = 1.0, Group()
        _beat = threading.Thread(target=lambda: events.append("beat ends"))

        def stop(self) -> None:
            events.append("stop")
            raise RuntimeError("a follower is gone")

    leader = Leader()
    leader._beat.start()
    _stop_quietly(leader)  # type: ignore[arg-type]
    # the heartbeat thread is joined before the close; it may end before or after STOP
    assert events[-1] == "close" and events.index("stop") < events.index("close")
    assert events.index("beat ends") < events.index("close")
