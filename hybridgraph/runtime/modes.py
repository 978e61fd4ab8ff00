"""What each engine mode and capture policy does, as data: the tables every layer reads.

| mode   | forward              | preprocessing + sampling                     |
| eager  | eager PyTorch        | eager                                        |
| jit    | eager PyTorch        | JIT-compiled                                 |
| graph  | CUDA-graph replay    | eager                                        |
| hybrid | CUDA-graph replay    | JIT-compiled, sampling captured in decode    |

No torch import here: the CLI builds its parser from these tables without loading torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")

BACKENDS = ("compile", "torchscript", "eager")   # JIT backends of the dynamic ops
KERNEL_CHOICES = ("auto", "inductor", "triton")  # decode kernels (EngineConfig.kernels)


@dataclass(frozen=True)
class ModeSpec:
    name: str
    uses_graphs: bool          # steps are captured and replayed as CUDA graphs (CUDA only)
    jit_ops: bool              # preprocessing and sampling run through the JIT backend
    compiled_forward: bool     # the transformer blocks run under torch.compile (compile backend)
    sampling_in_graph: bool    # decode graphs end with sampling, so decode keys name a sampler

    @property
    def needs_cuda(self) -> bool:
        return self.uses_graphs


MODE_SPECS: dict[str, ModeSpec] = {m.name: m for m in (
    ModeSpec("eager", uses_graphs=False, jit_ops=False, compiled_forward=False,
             sampling_in_graph=False),
    ModeSpec("jit", uses_graphs=False, jit_ops=True, compiled_forward=False,
             sampling_in_graph=False),
    ModeSpec("graph", uses_graphs=True, jit_ops=False, compiled_forward=False,
             sampling_in_graph=False),
    ModeSpec("hybrid", uses_graphs=True, jit_ops=True, compiled_forward=True,
             sampling_in_graph=True),
)}
MODES = tuple(MODE_SPECS)


def _named(table: dict[str, T], name: str, what: str) -> T:
    """table[name]; for an unknown name, a ValueError that lists the choices."""
    try:
        return table[name]
    except KeyError:
        raise ValueError(f"unknown {what} {name!r}; choose from {tuple(table)}") from None


def mode_spec(name: str) -> ModeSpec:
    """The spec of a mode by name; a clear error for an unknown one."""
    return _named(MODE_SPECS, name, "mode")


def auto_kernels(spec: ModeSpec, device_type: str, capability: tuple[int, int] | None) -> str:
    """`--kernels auto`: the Triton decode kernels where they were measured faster than the
    compiled blocks (hybrid on Hopper, docs/KERNELS.md), Inductor's everywhere else."""
    fast = spec.compiled_forward and device_type == "cuda" and (capability or (0, 0)) >= (9, 0)
    return "triton" if fast else "inductor"


def auto_mode(device_type: str) -> str:
    """`--mode auto`: hybrid where CUDA graphs exist, eager elsewhere."""
    return "hybrid" if device_type == "cuda" else "eager"


@dataclass(frozen=True)
class CapturePolicy:
    """When graphs get captured: at start-up, and what a step that finds none does."""

    name: str
    ahead: bool        # capture the coverage strategy's graphs when the engine starts
    on_miss: str       # "capture": now, then replay | "defer": run eagerly, capture when
                       # idle (Engine.run_pending_captures) | "eager": just run eagerly


CAPTURE_POLICIES: dict[str, CapturePolicy] = {c.name: c for c in (
    CapturePolicy("ahead", ahead=True, on_miss="eager"),
    CapturePolicy("on-demand", ahead=False, on_miss="capture"),
    CapturePolicy("background", ahead=False, on_miss="defer"),
    CapturePolicy("none", ahead=False, on_miss="eager"),
)}
CAPTURE_MODES = tuple(CAPTURE_POLICIES)


def capture_policy(name: str) -> CapturePolicy:
    return _named(CAPTURE_POLICIES, name, "capture mode")
