"""One model in memory, one engine at a time over it, memory freed between engines."""

from __future__ import annotations

import gc
import logging
from typing import Any

import torch

from hybridgraph.bench.config import BenchConfig
from hybridgraph.engine import DTYPES, Engine, EngineConfig
from hybridgraph.model.loader import load_model
from hybridgraph.model.tokenizer import Tokenizer

log = logging.getLogger(__name__)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


class Engines:
    """Builds engines over a model loaded once; asking for a different engine drops the
    previous one first (a 7B model's graphs, caches and pools don't fit twice)."""

    def __init__(self, cfg: BenchConfig) -> None:
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        self.dtype = DTYPES[cfg.dtype]
        self._model: Any = None
        self._tokenizer: Tokenizer | None = None
        self._engine: Engine | None = None
        self._key: EngineConfig | None = None

    def model(self) -> tuple[Any, Tokenizer]:
        if self._model is None:
            self._model, self._tokenizer = load_model(self.cfg.model, self.device, self.dtype)
        assert self._tokenizer is not None
        return self._model, self._tokenizer

    def get(self, mode: str, **options: Any) -> Engine:
        """An engine in `mode` (options: EngineConfig fields over BenchConfig.engine_config).
        The same request twice returns the same engine (no rebuild)."""
        config = self.cfg.engine_config(mode, **options)
        if self._engine is not None and self._key == config:
            return self._engine
        self.release()
        model, tok = self.model()
        log.info("building %s engine %s", mode, options)
        self._engine = Engine(model, tok, config)
        self._key = config
        return self._engine

    def release(self) -> None:
        self._engine, self._key = None, None
        free_memory()

    def close(self) -> None:
        self.release()
        self._model = self._tokenizer = None
        free_memory()
