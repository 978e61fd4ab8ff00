"""kernels/selfcheck.py's answer cache: a check started on a thread (`check_kernels_soon`,
as Engine.load starts it before the weights load) is the one `check_kernels` waits for,
each key is checked once, and a check that raises still answers."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
import torch

from hybridgraph.kernels import selfcheck


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """An empty answer cache and a stand-in check that records (thread, device) per call
    in `calls` and answers only once `release` is set."""
    calls: list[tuple[str, str]] = []
    release = threading.Event()

    def check(device: torch.device, dtype: torch.dtype, pdl: bool) -> tuple[bool, str]:
        calls.append((threading.current_thread().name, str(device)))
        assert release.wait(10)
        return True, f"checked {dtype}"

    monkeypatch.setattr(selfcheck, "_CACHE", {})
    monkeypatch.setattr(selfcheck, "_check", check)
    return SimpleNamespace(calls=calls, release=release)


def test_a_check_started_soon_runs_on_a_thread_and_is_the_one_waited_for(fresh) -> None:
    selfcheck.check_kernels_soon(torch.device("cpu"), torch.float16)
    selfcheck.check_kernels_soon("cpu", torch.float16)  # already started: nothing new
    answer: list[tuple[bool, str]] = []
    waiter = threading.Thread(target=lambda: answer.append(
        selfcheck.check_kernels(torch.device("cpu"), torch.float16)))
    waiter.start()
    waiter.join(0.2)
    assert waiter.is_alive() and not answer  # it waits for the thread's answer
    fresh.release.set()
    waiter.join(10)
    assert answer == [(True, "checked torch.float16")]
    assert fresh.calls == [("hybridgraph-kernel-check", "cpu")]  # one check, on the thread
    assert selfcheck.check_kernels("cpu", torch.float16) == (True, "checked torch.float16")
    assert len(fresh.calls) == 1


def test_each_key_is_checked_once_in_the_callers_thread(fresh) -> None:
    fresh.release.set()
    for _ in range(2):
        assert selfcheck.check_kernels("cpu", torch.bfloat16)[0]
    selfcheck.check_kernels("cpu", torch.bfloat16, pdl=True)
    assert [c[0] for c in fresh.calls] == [threading.current_thread().name] * 2


def test_a_check_that_raises_still_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(device: torch.device, dtype: torch.dtype, pdl: bool) -> tuple[bool, str]:
        raise RuntimeError("no driver")

    monkeypatch.setattr(selfcheck, "_CACHE", {})
    monkeypatch.setattr(selfcheck, "_check", broken)
    selfcheck.check_kernels_soon("cpu", torch.float16)
    ok, reason = selfcheck.check_kernels("cpu", torch.float16)
    assert not ok and "RuntimeError: no driver" in reason


def test_on_a_cpu_the_real_check_says_why_not() -> None:
    ok, reason = selfcheck.check_kernels(torch.device("cpu"), torch.float16)
    assert not ok and ("CUDA" in reason or "triton" in reason.lower())
