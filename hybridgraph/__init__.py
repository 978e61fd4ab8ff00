"""hybridgraph: low-latency LLM inference with CUDA-graph forwards and JIT-compiled dynamic ops."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["Client", "AsyncClient", "Engine", "EngineConfig", "SamplingParams",
           "GenerationResult"]


def __getattr__(name: str) -> Any:
    # Lazy, so `import hybridgraph` stays cheap and a client never imports the model layer.
    if name in ("SamplingParams", "GenerationResult"):  # torch-free: clients use them
        from hybridgraph import request

        return getattr(request, name)
    if name in ("Engine", "EngineConfig"):
        from hybridgraph import engine

        return getattr(engine, name)
    if name in ("Client", "AsyncClient"):
        from hybridgraph.server import client

        return getattr(client, name)
    raise AttributeError(name)
