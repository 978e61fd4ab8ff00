"""Engine: prefill + decode loop over the model, in one of four modes.

| mode   | forward              | preprocessing + sampling                     |
| eager  | eager PyTorch        | eager                                        |
| jit    | eager PyTorch        | JIT-compiled                                 |
| graph  | CUDA-graph replay    | eager                                        |
| hybrid | CUDA-graph replay    | JIT-compiled, sampling captured in decode    |

On CUDA the decode loop runs one step ahead of the host: step i+1 is launched before
token i is read back, so the GPU never waits for Python between tokens. A stop costs at
most one wasted step, whose writes land past the request's last position.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from hybridgraph.model.llama import Transformer
from hybridgraph.model.loader import load_model
from hybridgraph.model.tokenizer import Tokenizer
from hybridgraph.request import GenerationResult, RequestError, SamplingParams, TokenCallback
from hybridgraph.runtime.dynamic import choose_bucket, dynamic_ops, pow2_buckets
from hybridgraph.runtime.graphs import GraphCache, GraphKey, parse_coverage
from hybridgraph.runtime.step import StepBuffers, Steps, TokenReader

log = logging.getLogger(__name__)

__all__ = ["DTYPES", "MODES", "Engine", "GenerationResult", "RequestError", "SamplingParams"]

MODES = ("eager", "jit", "graph", "hybrid")
CAPTURE_MODES = ("ahead", "on-demand", "background", "none")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
PAD_ID = 0


class Engine:
    """Serves one model. It allocates the model's KV cache and captures graphs over it, so
    a model belongs to one live Engine at a time: a second Engine over the same model
    replaces the cache under the first one's graphs."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, *, mode: str = "auto",
                 backend: str = "compile", max_batch: int = 1, max_seq_len: int | None = None,
                 coverage: str = "pow2", capture: str = "ahead", max_graphs: int | None = None,
                 max_graph_bytes: int | None = None, shared_pool: bool = True,
                 progress: bool = False) -> None:
        self.model, self.tokenizer, self.config = model, tokenizer, model.config
        self.device = model.tok_embeddings.weight.device
        self.dtype = model.tok_embeddings.weight.dtype
        if mode == "auto":
            mode = "hybrid" if self.device.type == "cuda" else "eager"
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose from {MODES}")
        if mode in ("graph", "hybrid") and self.device.type != "cuda":
            raise ValueError(f"mode {mode!r} needs a CUDA device; use eager or jit on {self.device}")
        if capture not in CAPTURE_MODES:
            raise ValueError(f"unknown capture mode {capture!r}; choose from {CAPTURE_MODES}")
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be an integer >= 1, got {max_batch!r}")
        if max_seq_len is not None and (not isinstance(max_seq_len, int) or max_seq_len < 2):
            raise ValueError(f"max_seq_len must be an integer >= 2, got {max_seq_len!r}")
        self.mode, self.capture_mode = mode, capture
        self.ops = dynamic_ops(backend if mode in ("jit", "hybrid") else "eager")
        self.max_batch = max_batch
        self.max_seq_len = min(max_seq_len if max_seq_len is not None else 2048,
                               self.config.max_position_embeddings)
        model.setup_caches(max_batch, self.max_seq_len)
        self.bufs = StepBuffers(max_batch, self.max_seq_len, self.device)
        # hybrid with the compile backend: the forward is JIT-compiled too, then captured.
        self.steps = Steps(model, self.bufs,
                           compile_forward=mode == "hybrid" and self.ops.backend == "compile")
        self.reader = TokenReader(max_batch, self.device)
        self.batch_buckets = pow2_buckets(1, max_batch)
        self.windows = pow2_buckets(min(256, self.max_seq_len), self.max_seq_len)
        self.coverage = coverage
        self.prefill_lengths = parse_coverage(coverage, self.max_seq_len)
        self.graphs: GraphCache | None = None
        self.pending: set[GraphKey] = set()   # captures deferred to idle time
        self.requests_served = 0
        if mode in ("graph", "hybrid"):
            self.graphs = GraphCache(max_graphs, max_graph_bytes, shared_pool)
            if capture == "ahead":
                self.capture_ahead(progress=progress)
        if mode != "eager":
            self.warmup()

    def warmup(self) -> None:
        """Compile the JIT functions for every batch bucket and sampler now, at start-up,
        rather than inside some request's TTFT."""
        for b in self.batch_buckets:
            for temp in (0.0, 1.0):
                for p in ([1], [1, 2]):  # torch.compile specialises size-1 dims
                    self.generate_batch([p] * b, 2, [SamplingParams(temp, seed=0)] * b)
        self.requests_served = 0

    @classmethod
    def load(cls, model: str, device: str = "auto", dtype: str = "auto", seed: int = 0,
             **kwargs: Any) -> Engine:
        """A preset name or local HF directory -> a ready Engine."""
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if dtype == "auto":
            dtype = "float16" if device.startswith("cuda") else "float32"
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
        m, tok = load_model(model, device, DTYPES[dtype], seed=seed)
        return cls(m, tok, **kwargs)

    # ------------------------------------------------------------------ validation

    def validate(self, prompt_ids: Sequence[int], max_new_tokens: int) -> None:
        if not isinstance(prompt_ids, list | tuple) or len(prompt_ids) == 0:
            raise RequestError("prompt", "must be a non-empty list of token ids")
        vocab = self.config.vocab_size
        for t in prompt_ids:
            if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab:
                raise RequestError("prompt", f"token id {t!r} is outside the vocabulary [0, {vocab})")
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) \
                or max_new_tokens < 1:
            raise RequestError("max_new_tokens", f"must be an integer >= 1, got {max_new_tokens!r}")
        if len(prompt_ids) >= self.max_seq_len:
            raise RequestError("prompt", f"{len(prompt_ids)} tokens do not fit the KV cache "
                                         f"(max_seq_len {self.max_seq_len})")
        if len(prompt_ids) + max_new_tokens > self.max_seq_len:
            raise RequestError("max_new_tokens",
                               f"prompt {len(prompt_ids)} + {max_new_tokens} new tokens exceed "
                               f"the KV cache (max_seq_len {self.max_seq_len})")

    # -------------------------------------------------------------------- generate

    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int = 32,
                 sampling: SamplingParams | None = None, stop_ids: Sequence[int] | None = None,
                 on_token: TokenCallback | None = None) -> GenerationResult:
        return self.generate_batch([prompt_ids], max_new_tokens, [sampling or SamplingParams()],
                                   stop_ids, on_token)[0]

    def generate_batch(self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 32,
                       sampling: Sequence[SamplingParams] | None = None,
                       stop_ids: Sequence[int] | None = None,
                       on_token: TokenCallback | None = None) -> list[GenerationResult]:
        """Generate for up to max_batch prompts at once (rows stop independently)."""
        if not 1 <= len(prompts) <= self.max_batch:
            raise RequestError("prompts", f"batch of {len(prompts)}; this engine serves 1 to "
                                          f"{self.max_batch} prompts at once")
        sampling = list(sampling) if sampling is not None else [SamplingParams()] * len(prompts)
        if len(sampling) != len(prompts):
            raise RequestError("sampling", "one SamplingParams per prompt")
        for p in prompts:
            self.validate(p, max_new_tokens)
        for s in sampling:
            s.validate()
        stops = set(self.tokenizer.eos_ids if stop_ids is None else stop_ids)
        with torch.inference_mode():
            results = self._generate(prompts, max_new_tokens, sampling, stops, on_token)
        self.requests_served += 1
        return results

    def _generate(self, prompts: Sequence[Sequence[int]], max_new: int,
                  sampling: list[SamplingParams], stops: set[int],
                  on_token: TokenCallback | None) -> list[GenerationResult]:
        t_start = time.perf_counter()
        n, lengths = len(prompts), [len(p) for p in prompts]
        b = choose_bucket(n, self.batch_buckets)
        kind = "greedy" if all(s.temperature == 0 for s in sampling) else "sample"
        self._load_sampling(sampling, b)
        self._prefill(prompts, lengths, b, kind)
        self.reader.push(0, self.bufs.ids[:n])
        max_pos = max(lengths) - 1

        results = [GenerationResult([], lengths[r], 0.0) for r in range(n)]
        live = list(range(n))
        # Look ahead only where launches are asynchronous (CUDA): on the CPU a launch *is*
        # the computation, and running it early would bill it to the previous token.
        pipelined = self.device.type == "cuda"

        def launch(step: int) -> None:  # decode step `step` produces token `step`
            self._decode(b, max_pos + step, kind)
            self.reader.push(step, self.bufs.ids[:n])

        t_prev = t_start
        for i in range(max_new):
            # After token 0 (TTFT) the pipeline runs one step ahead of the host.
            ahead = pipelined and i >= 1 and i + 1 < max_new
            if ahead:
                launch(i + 1)
            tokens = self.reader.read(i, n)
            now = time.perf_counter()
            for r in list(live):
                res = results[r]
                res.tokens.append(tokens[r])
                if i == 0:
                    res.ttft_ms = (now - t_start) * 1e3
                else:
                    res.token_ms.append((now - t_prev) * 1e3)
                keep = on_token(r, tokens[r]) if on_token is not None else True
                if keep is False:
                    res.finish_reason = "cancelled"
                    live.remove(r)
                elif tokens[r] in stops:
                    res.finish_reason = "stop"
                    live.remove(r)
            t_prev = now
            if not live:
                break
            if not ahead and i + 1 < max_new:
                launch(i + 1)
        return results

    def _load_sampling(self, sampling: list[SamplingParams], b: int) -> None:
        rows = len(sampling)
        pad = [SamplingParams()] * (b - rows)
        params = sampling + pad
        seeds = [s.seed if s.seed is not None else random.getrandbits(62) for s in params]
        bufs = self.bufs
        bufs.temperature[:b].copy_(torch.tensor([float(s.temperature) for s in params]))
        bufs.top_k[:b].copy_(torch.tensor([s.top_k for s in params]))
        bufs.top_p[:b].copy_(torch.tensor([float(s.top_p) for s in params]))
        bufs.seed[:b].copy_(torch.tensor(seeds))

    # ---------------------------------------------------------------- step dispatch

    def _prefill(self, prompts: Sequence[Sequence[int]], lengths: list[int], b: int,
                 kind: str) -> None:
        """Fit prompts to a shape, run the forward (replayed or eager), sample token 0."""
        longest = max(lengths)
        entry, t = None, longest
        if self.graphs is not None:
            want = GraphKey("prefill", b, choose_bucket(longest, self.prefill_lengths), "none")
            found = self._find_graph(want)
            if found is not None:
                entry, t = self.graphs.graphs[found], found.length
        host = torch.full((len(prompts), longest), PAD_ID, dtype=torch.int64)
        for r, p in enumerate(prompts):
            host[r, :len(p)] = torch.tensor(p, dtype=torch.int64)
        ids = host.to(self.device, non_blocking=True)
        lens = torch.tensor(lengths, dtype=torch.int64).to(self.device, non_blocking=True)
        padded, last = self.ops.fit_to_bucket(ids, lens, b, t, PAD_ID)
        self.bufs.prompt_ids[:b, :t].copy_(padded)
        self.bufs.last_idx[:b].copy_(last)
        if entry is not None:
            entry.graph.replay()
            logits = entry.output
        else:
            logits = self.steps.forward_prefill(b, t)
        self.steps.finish_prefill(logits, b, self.ops.sampler(kind))

    def _decode(self, b: int, max_pos: int, kind: str) -> None:
        """One decode step for rows [:b]; the newest token of any row sits at <= max_pos."""
        if self.graphs is None:
            logits = self.steps.forward_decode(b, max_pos + 1)
            self.steps.finish_decode(logits, b, self.ops.sampler(kind))
            return
        window = choose_bucket(max_pos + 1, self.windows)
        key = self._decode_key(b, window, kind)
        found = self._find_graph(key)
        if found is None:
            logits = self.steps.forward_decode(b, window)
            self.steps.finish_decode(logits, b, self.ops.sampler(kind))
            return
        entry = self.graphs.graphs[found]
        entry.graph.replay()
        if self.mode == "graph":
            self.steps.finish_decode(entry.output, b, self.ops.sampler(kind))

    def _decode_key(self, b: int, window: int, kind: str) -> GraphKey:
        return GraphKey("decode", b, window, kind if self.mode == "hybrid" else "none")

    def _find_graph(self, key: GraphKey) -> GraphKey | None:
        assert self.graphs is not None
        found = self.graphs.lookup(key)  # a larger bucket serves too: padding is masked
        if found is not None:
            return found
        if self.capture_mode == "on-demand":
            if self._capture(key) is not None:
                return key
        elif self.capture_mode == "background":
            self.pending.add(key)
        self.graphs.stats.fallbacks += 1
        return None

    # --------------------------------------------------------------------- capture

    def _graph_fn(self, key: GraphKey) -> Callable[[], Any]:
        steps, b, n = self.steps, key.batch, key.length
        if key.phase == "prefill":
            return lambda: steps.forward_prefill(b, n)
        if self.mode == "graph":
            return lambda: steps.forward_decode(b, n)
        sampler = self.ops.sampler(key.sampler)
        return lambda: steps.finish_decode(steps.forward_decode(b, n), b, sampler)

    def _capture(self, key: GraphKey) -> Any:
        """Capture without disturbing a request in flight: warm-ups run on a snapshot of the
        step state, restored before the capture and after it."""
        assert self.graphs is not None
        bufs, snap = self.bufs, self.bufs.snapshot()

        def prepare() -> None:
            bufs.restore(snap)
            if key.phase == "prefill":  # a stale last index may lie past this bucket
                bufs.last_idx.clamp_(max=key.length - 1)

        with torch.inference_mode():
            entry = self.graphs.capture(key, self._graph_fn(key), prepare=prepare)
        bufs.restore(snap)
        return entry

    def graph_keys(self, lengths: Sequence[int] | None = None) -> list[GraphKey]:
        """Every graph the coverage strategy asks for, largest first (one shared pool)."""
        samplers = ("greedy", "sample") if self.mode == "hybrid" else ("none",)
        keys = [GraphKey("decode", b, w, s) for b in self.batch_buckets for w in self.windows
                for s in samplers]
        keys += [GraphKey("prefill", b, n, "none") for b in self.batch_buckets
                 for n in (lengths if lengths is not None else self.prefill_lengths)]
        return sorted(keys, key=lambda k: (k.batch * k.length, k.phase), reverse=True)

    def check_capture_lengths(self, lengths: Sequence[int]) -> None:
        """A capture request may only name prompt lengths this engine can serve: a graph
        for a longer one would be picked as a "larger bucket" that no buffer can hold."""
        if not lengths:
            raise RequestError("lengths", "must name at least one prompt length")
        for n in lengths:
            if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n < self.max_seq_len:
                raise RequestError("lengths", f"{n!r} is not a prompt length in "
                                              f"[1, {self.max_seq_len - 1}]")

    def capture_ahead(self, lengths: Sequence[int] | None = None, progress: bool = False) -> int:
        """Capture the graphs for `lengths` (default: the coverage strategy). Returns how many
        graphs are held afterwards."""
        if lengths is not None:
            self.check_capture_lengths(lengths)
        if self.graphs is None:
            return 0
        keys = [k for k in self.graph_keys(lengths) if k not in self.graphs]
        if lengths is not None:
            keys = [k for k in keys if k.phase == "prefill"]
        if progress:
            from tqdm import tqdm
            keys = tqdm(keys, desc="capturing graphs", unit="graph")
        for key in keys:
            self._capture(key)
        return len(self.graphs.graphs)

    def run_pending_captures(self, budget_s: float = 0.5) -> int:
        """Capture graphs that requests missed, for up to budget_s (call when idle)."""
        done, t0 = 0, time.perf_counter()
        while self.pending and time.perf_counter() - t0 < budget_s:
            key = self.pending.pop()
            if self.graphs is not None and key not in self.graphs:
                self._capture(key)
                done += 1
        return done

    # ----------------------------------------------------------------------- status

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "model": self.config.name, "mode": self.mode, "backend": self.ops.backend,
            "device": str(self.device), "dtype": str(self.dtype).removeprefix("torch."),
            "max_batch": self.max_batch, "max_seq_len": self.max_seq_len,
            "coverage": self.coverage, "requests_served": self.requests_served,
        }
        if self.graphs is not None:
            out["graphs"] = {"held": len(self.graphs.graphs), "pending": len(self.pending),
                             **self.graphs.stats.as_dict()}
        if self.device.type == "cuda":
            out["gpu_memory"] = {"allocated": torch.cuda.memory_allocated(self.device),
                                 "reserved": torch.cuda.memory_reserved(self.device),
                                 "total": torch.cuda.get_device_properties(self.device).total_memory}
        return out
