"""kernels/launch.py on the CPU: inside `compile_ahead()` a launch only compiles (through
Triton's interpreter: nothing runs), after it launches run again; and the graph runner's
dry pass over its keys (runtime/runner.py), which restores the step state it found.
The real parallel compile on a GPU: tests/gpu/test_launch.py.
"""

from __future__ import annotations

import pytest
import torch

from hybridgraph.engine import Engine
from hybridgraph.kernels import launch as ln
from hybridgraph.model.loader import load_model
from hybridgraph.runtime.graphs import GraphKey
from tests.triton_interpreter import TOL, nan, needs_interpreter, rnd


@needs_interpreter
def test_launches_inside_compile_ahead_only_compile() -> None:
    from hybridgraph.kernels import glue
    from hybridgraph.kernels import reference as ref
    gu = rnd(2, 2 * 40)
    out = nan(2, 40)
    with ln.compile_ahead(workers=2) as ahead:
        assert ahead and ln.compiling_ahead()
        glue.silu_mul(gu, out)
        assert out.isnan().all()  # dry: nothing ran
    assert not ln.compiling_ahead()
    glue.silu_mul(gu, out)
    g, u = gu[:, :40].float(), gu[:, 40:].float()
    assert ref.rel_err(out, torch.nn.functional.silu(g) * u) < TOL


def test_nested_compile_ahead_stays_dry_and_yields_false() -> None:
    with ln.compile_ahead(workers=1) as outer:
        with ln.compile_ahead(workers=1) as inner:
            assert ln.compiling_ahead()
        assert ln.compiling_ahead()
    assert outer and not inner and not ln.compiling_ahead()


def test_without_async_compile_launches_run_as_usual(monkeypatch) -> None:
    monkeypatch.setattr(ln, "_async_mode", lambda: None)
    ran = []

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **kw: ran.append((grid, args, kw))

        def warmup(self, *args, grid, **kw):  # must not be called
            raise AssertionError("a dry launch outside compile_ahead")

    with ln.compile_ahead() as ahead:
        assert not ahead
        ln.launch(Kernel(), (3,), 1, BLOCK=4)
    assert ran == [((3,), (1,), {"BLOCK": 4})]


@pytest.fixture
def engine() -> Engine:
    model, tok = load_model("tiny", "cpu", seed=0)
    return Engine(model, tok, mode="eager", max_batch=2, max_seq_len=32)


KEYS = [GraphKey("decode", 2, 32, "none"), GraphKey("prefill", 1, 8, "none")]


def test_runner_dry_pass_runs_every_step_and_restores_the_state(engine, monkeypatch) -> None:
    runner, bufs = engine.runner, engine.steps.bufs
    assert not runner.compile_ahead(KEYS)  # the Inductor blocks: nothing to compile ahead
    monkeypatch.setattr(engine.steps, "kernels", "triton")
    seen = []
    for name in ("forward_decode", "forward_prefill"):
        real = getattr(engine.steps, name)
        monkeypatch.setattr(engine.steps, name,
                            lambda b, n, real=real, name=name: (seen.append((name, b, n)),
                                                                real(b, n))[1])
    bufs.ids.fill_(7)
    bufs.pos.fill_(3)
    bufs.last_idx.fill_(20)  # past the prefill bucket: the dry prefill must clamp it
    before = [t.clone() for t in bufs.snapshot()]
    assert runner.compile_ahead(KEYS)
    assert seen == [("forward_decode", 2, 32), ("forward_prefill", 1, 8)]
    assert all(torch.equal(a, b) for a, b in zip(before, bufs.snapshot(), strict=True))


def test_runner_skips_the_dry_pass_under_an_observer(engine, monkeypatch) -> None:
    """A tensor-parallel leader's ranks would not run the dry steps with it."""
    monkeypatch.setattr(engine.steps, "kernels", "triton")
    engine.runner.observer = object()  # type: ignore[assignment]
    assert not engine.runner.compile_ahead(KEYS)


def test_a_dry_step_that_fails_is_left_to_its_capture(engine, monkeypatch) -> None:
    """The dry pass is only a head start: a step that raises (the capture meets the error
    again, counts it and serves that key eagerly) does not stop the other keys."""
    monkeypatch.setattr(engine.steps, "kernels", "triton")

    def broken(b: int, n: int):
        raise ValueError("no kernel for this shape")
    seen = []
    real = engine.steps.forward_decode
    monkeypatch.setattr(engine.steps, "forward_prefill", broken)
    monkeypatch.setattr(engine.steps, "forward_decode",
                        lambda b, n: (seen.append(b), real(b, n))[1])
    assert engine.runner.compile_ahead(KEYS[::-1])
    assert seen == [2]
