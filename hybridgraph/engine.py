"""Engine: prefill + decode loop over the model, in one of four modes (runtime/modes.py).

Graphs belong to the runner (runtime/runner.py): the engine asks it to plan a step, fills
the step buffers to the planned shape, and has it run the step, replayed or eager.

On CUDA the decode loop runs one step ahead of the host: step i+1 is launched before
token i is read back, so the GPU never waits for Python between tokens. A stop costs at
most one wasted step, whose writes land past the request's last position.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch

from hybridgraph.engine_config import DTYPE_NAMES, EngineConfig
from hybridgraph.model.generation import GenerationDefaults
from hybridgraph.model.kernel_plan import KernelPlan
from hybridgraph.model.kv_budget import default_max_seq_len
from hybridgraph.model.llama import Transformer
from hybridgraph.model.loader import auto_dtype, load_model
from hybridgraph.model.tokenizer import Tokenizer
from hybridgraph.request import (
    GenerationResult,
    RequestError,
    SamplingParams,
    TextCallback,
    TokenCallback,
    check_stop_ids,
)
from hybridgraph.runtime.dynamic import choose_bucket, dynamic_ops, pow2_buckets
from hybridgraph.runtime.graphs import GraphCache, GraphKey, parse_coverage
from hybridgraph.runtime.modes import MODES, auto_mode, capture_policy, mode_spec
from hybridgraph.runtime.runner import GraphRunner, decode_windows
from hybridgraph.runtime.step import GREEDY, StepBuffers, Steps, TokenReader
from hybridgraph.text import TextStream, validate_stop

__all__ = ["DTYPES", "MODES", "Engine", "EngineConfig", "GenerationResult", "RequestError",
           "SamplingParams"]

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}
PAD_ID = 0


class Engine:
    """Serves one model. It allocates the model's KV cache and captures graphs over it, so
    a model belongs to one live Engine at a time: a second Engine over the same model
    replaces the cache under the first one's graphs.

    Options come as an EngineConfig, or as its fields by keyword (which build one).
    """

    def __init__(self, model: Transformer, tokenizer: Tokenizer,
                 config: EngineConfig | None = None, **options: Any) -> None:
        cfg = replace(config or EngineConfig(), **options)
        self.model, self.tokenizer, self.config = model, tokenizer, model.config
        self.device = model.tok_embeddings.weight.device
        self.dtype = model.tok_embeddings.weight.dtype
        self.mode = auto_mode(self.device.type) if cfg.mode == "auto" else cfg.mode
        self.spec = mode_spec(self.mode)
        if self.spec.needs_cuda and self.device.type != "cuda":
            raise ValueError(f"mode {self.mode!r} needs a CUDA device; use eager or jit on "
                             f"{self.device}")
        self.engine_config = cfg = replace(cfg, mode=self.mode)
        self.ops = dynamic_ops(cfg.backend if self.spec.jit_ops else "eager")
        self.max_batch = cfg.max_batch
        # issue 11: the default is the model's context limit, capped by free memory.
        self.max_seq_len = min(cfg.max_seq_len if cfg.max_seq_len is not None else
                               default_max_seq_len(self.config, self.max_batch, self.dtype,
                                                   self.device),
                               self.config.max_position_embeddings)
        # The checkpoint's generation_config.json sampling defaults (greedy when absent).
        self.generation: GenerationDefaults = self.config.extra.get("generation",
                                                                    GenerationDefaults())
        model.setup_caches(self.max_batch, self.max_seq_len)
        self.bufs = StepBuffers(self.max_batch, self.max_seq_len, self.device)
        # With the compile backend, a compiled-forward mode (hybrid) compiles the blocks too.
        kernels = cfg.kernels_on(self.device)
        self.steps_note = "auto: Triton decode kernels serve hybrid mode on sm_90+ only" \
            if cfg.kernels == "auto" and kernels == "inductor" else ""
        # Where start-up time goes (seconds per phase), for stats() and the cost bench.
        self.startup_s: dict[str, float] = {}
        t0 = time.perf_counter()
        # check=False: the kernels' self-check (started before the load) is waited for
        # after the capture's dry pass, so its compiles and the dry pass's overlap.
        self.steps = Steps(model, self.bufs, compile_forward=self.spec.compiled_forward
                           and self.ops.backend == "compile", kernels=kernels,
                           plan=KernelPlan(pdl=cfg.pdl), check=False)
        self._jit_ops, self._check_wait_s = self.ops, 0.0
        if self.ops.backend == "compile" and self.steps.fast is not None:
            # Both samplers on the kernels: faster than Inductor's, and no Dynamo frame.
            fast = self.steps.fast
            self.ops = replace(self.ops, greedy=fast.greedy, sample=fast.sample)
        self.reader = TokenReader(self.bufs)
        self._all_rows = [1] * self.max_batch
        self.batch_buckets = pow2_buckets(1, self.max_batch)
        self.runner = GraphRunner(
            self.steps, self.ops, self.spec, capture_policy(cfg.capture),
            batch_buckets=self.batch_buckets,
            windows=decode_windows(self.max_seq_len),
            prefill_lengths=parse_coverage(cfg.coverage, self.max_seq_len),
            max_graphs=cfg.max_graphs, max_graph_bytes=cfg.max_graph_bytes,
            shared_pool=cfg.shared_pool)
        self.requests_served = 0
        t1 = time.perf_counter()
        # The tensor-parallel all-reduce in use and why (parallel.build_rank sets them).
        self.allreduce, self.allreduce_reason = "none", "one rank"
        if self.runner.policy.ahead:
            self.runner.capture_ahead(progress=cfg.progress,
                                      after_dry_pass=self._confirm_kernels)
        self._confirm_kernels()  # where no dry pass ran
        t2 = time.perf_counter()
        # Steps and the wait for the Triton self-check; compiling the forward + capturing.
        self.startup_s["kernels"] = t1 - t0 + self._check_wait_s
        self.startup_s["capture"] = t2 - t1 - self._check_wait_s
        self.startup_s["compile"] = self.runner.compile_s  # of it: the dry pass (Triton)
        if self.spec.jit_ops or self.spec.uses_graphs:
            self.warmup()
        self.startup_s["warmup"] = time.perf_counter() - t2  # JIT ops for every bucket

    def _confirm_kernels(self) -> None:
        """Wait for the kernels' self-check; where it failed, the blocks and the JIT
        samplers serve instead (nothing was captured on the kernels yet)."""
        t = time.perf_counter()
        if self.steps.fast is not None and not self.steps.confirm_kernels():
            self.ops = self.runner.ops = self._jit_ops
        self._check_wait_s += time.perf_counter() - t

    def warmup(self) -> None:
        """Compile the JIT functions for every batch bucket and sampler now, at start-up,
        rather than inside some request's TTFT."""
        for b in self.batch_buckets:
            for temp in (0.0, 1.0):
                for p in ([1], [1, 2]):  # torch.compile specialises size-1 dims
                    self.generate_batch([p] * b, 2, [SamplingParams(temp, seed=0)] * b)
        self.requests_served = 0

    @classmethod
    def load(cls, model: str, device: str | None = None, dtype: str | None = None,
             seed: int | None = None, config: EngineConfig | None = None,
             **options: Any) -> Engine:
        """A preset name or local HF directory -> a ready Engine. device, dtype and seed
        (of a random preset's weights), where given, win over the config's."""
        cfg = replace(config or EngineConfig(), **options)
        given = {"device": device, "dtype": dtype, "weights_seed": seed}
        cfg = replace(cfg, **{k: v for k, v in given.items() if v is not None})
        if cfg.tp != 1:
            raise ValueError(f"tp {cfg.tp}: Engine.load builds one rank's engine; use "
                             "hybridgraph.parallel.load_engine in each rank's process")
        device = cfg.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        # issue 11: auto follows the checkpoint's own dtype (float32 on a CPU).
        torch_dtype = auto_dtype(model, device) if cfg.dtype == "auto" else DTYPES[cfg.dtype]
        cfg.start_kernel_check(torch.device(device), torch_dtype)  # overlaps the load
        m, tok = load_model(model, device, torch_dtype, seed=cfg.weights_seed,
                            tokenizer=cfg.tokenizer, chat_template=cfg.chat_template)
        return cls(m, tok, cfg)

    # ---------------------------------------------------------------- graph access

    @property
    def graphs(self) -> GraphCache | None:
        """The runner's graph store, for inspection (None in modes without graphs)."""
        return self.runner.cache

    @property
    def pending(self) -> set[GraphKey]:
        """Graphs that steps missed, waiting for `run_pending_captures`."""
        return self.runner.pending

    @property
    def capture_mode(self) -> str:
        return self.engine_config.capture

    @property
    def coverage(self) -> str:
        return self.engine_config.coverage

    # ------------------------------------------------------------------ validation

    def validate(self, prompt_ids: Sequence[int], max_new_tokens: int) -> None:
        if not isinstance(prompt_ids, list | tuple) or len(prompt_ids) == 0:
            raise RequestError("prompt", "must be a non-empty list of token ids")
        vocab = self.config.vocab_size
        # The common case in builtins: 500 ids in 27 us against the per-token loop's 45 on
        # a development CPU, host time spent before the prefill launches; the loop then
        # names the first bad id.
        if not (set(map(type, prompt_ids)) == {int}
                and 0 <= min(prompt_ids) and max(prompt_ids) < vocab):
            for t in prompt_ids:
                if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab:
                    raise RequestError("prompt", f"token id {t!r} is outside the vocabulary "
                                                 f"[0, {vocab})")
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
                 on_token: TokenCallback | None = None, *, stop: Sequence[str] | None = None,
                 ignore_eos: bool = False, on_text: TextCallback | None = None,
                 ) -> GenerationResult:
        return self.generate_batch([prompt_ids], max_new_tokens, [SamplingParams.of(sampling)],
                                   stop_ids, on_token, stop=stop, ignore_eos=ignore_eos,
                                   on_text=on_text)[0]

    def generate_batch(self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 32,
                       sampling: Sequence[SamplingParams] | None = None,
                       stop_ids: Sequence[int] | None = None,
                       on_token: TokenCallback | None = None, *,
                       stop: Sequence[str] | None = None, ignore_eos: bool = False,
                       on_text: TextCallback | None = None) -> list[GenerationResult]:
        """Generate for up to max_batch prompts at once (rows stop independently).

        Rows end at an id in stop_ids (default: the model's end ids, none with ignore_eos),
        or where their text contains a stop string (cut before it). With stop strings or
        on_text, results carry `text` and on_text gets each token's text delta."""
        if not 1 <= len(prompts) <= self.max_batch:
            raise RequestError("prompts", f"batch of {len(prompts)}; this engine serves 1 to "
                                          f"{self.max_batch} prompts at once")
        sampling = list(sampling) if sampling is not None else [SamplingParams()] * len(prompts)
        if len(sampling) != len(prompts):
            raise RequestError("sampling", "one SamplingParams per prompt")
        for p in prompts:
            self.validate(p, max_new_tokens)
        sampling = [SamplingParams.of(s) for s in sampling]
        stop_ids = check_stop_ids(stop_ids)
        stop_strings = validate_stop(stop)
        # issue 11: ignore_eos leaves only the given stop ids; stop strings and on_text need
        # each row's text as it is generated.
        stops = set(stop_ids or ()) if ignore_eos or stop_ids is not None else \
            set(self.tokenizer.eos_ids)
        texts = [TextStream(self.tokenizer, stop_strings) for _ in prompts] \
            if stop_strings or on_text is not None else None
        with torch.inference_mode():
            results = self._generate(prompts, max_new_tokens, sampling, stops, on_token,
                                     texts, on_text)
        self.requests_served += 1
        return results

    def _generate(self, prompts: Sequence[Sequence[int]], max_new: int,
                  sampling: list[SamplingParams], stops: set[int],
                  on_token: TokenCallback | None, texts: list[TextStream] | None = None,
                  on_text: TextCallback | None = None) -> list[GenerationResult]:
        t_start = time.perf_counter()
        n, lengths = len(prompts), [len(p) for p in prompts]
        b = choose_bucket(n, self.batch_buckets)
        kind = "greedy" if all(s.temperature == 0 for s in sampling) else "sample"
        # Rows and mask as a batch leaves them: host-side checks, no copy unless a
        # scheduler ran on this engine last.
        self.bufs.set_prefill_rows(0)
        self.bufs.set_active(self._all_rows)
        self._load_sampling(sampling, b)
        first = self._prefill(prompts, lengths, b, kind)[:n]  # token 0's position per row
        self.reader.push(0)
        max_pos = max(lengths) - 1
        rows = range(n)

        results = [GenerationResult([], lengths[r], 0.0) for r in range(n)]
        live = list(range(n))
        # Look ahead only where launches are asynchronous (CUDA): on the CPU a launch *is*
        # the computation, and running it early would bill it to the previous token.
        pipelined = self.device.type == "cuda"

        def launch(step: int) -> None:  # decode step `step` produces token `step`
            self._decode(b, max_pos + step, kind)
            self.reader.push(step)

        t_prev = t_start
        for i in range(max_new):
            # After token 0 (TTFT) the pipeline runs one step ahead of the host.
            ahead = pipelined and i >= 1 and i + 1 < max_new
            if ahead:
                launch(i + 1)
            tokens = self.reader.read(i, rows, [p + i for p in first])
            now = time.perf_counter()
            for r in list(live):
                res = results[r]
                res.tokens.append(tokens[r])
                if i == 0:
                    res.ttft_ms = (now - t_start) * 1e3
                else:
                    res.token_ms.append((now - t_prev) * 1e3)
                done, delta = tokens[r] in stops, ""
                if texts is not None:  # issue 11: text deltas and stop strings
                    delta, hit = texts[r].step(tokens[r], final=done or i + 1 == max_new)
                    done = done or hit
                    res.text = texts[r].text
                keep = on_token(r, tokens[r]) if on_token is not None else True
                if on_text is not None and on_text(r, tokens[r], delta) is False:
                    keep = False
                if keep is False:
                    res.finish_reason = "cancelled"
                    live.remove(r)
                elif done:
                    res.finish_reason = "stop"
                    live.remove(r)
            t_prev = now
            if not live:
                break
            if not ahead and i + 1 < max_new:
                launch(i + 1)
        return results

    def _load_sampling(self, sampling: list[SamplingParams], b: int, first: int = 0) -> None:
        """Sampling parameters of rows first..first+b-1 (padded with greedy rows); never
        waits for the GPU (other rows' steps may be in flight)."""
        params = [GREEDY if s.temperature == 0 else
                  (float(s.temperature), s.top_k, float(s.top_p),
                   s.seed if s.seed is not None else random.getrandbits(62))
                  for s in sampling]
        self.bufs.set_sampling(first, params + [GREEDY] * (b - len(params)))

    # ---------------------------------------------------- rows chosen at run time

    def prefill_row(self, row: int, prompt: Sequence[int], sampling: SamplingParams) -> int:
        """Prefill one validated prompt into cache row `row` (the others untouched) and
        sample its token 0 into that row's slot of the step buffers; nothing is read back.
        Returns token 0's position. For the batching scheduler, which keeps other rows
        decoding around it."""
        self._load_sampling([sampling], 1, first=row)
        self.bufs.set_prefill_rows(row)
        return self._prefill([prompt], [len(prompt)], 1, "greedy" if sampling.temperature == 0
                             else "sample")[0]

    def decode_rows(self, b: int, active: list[int], max_pos: int, kind: str) -> None:
        """One decode step over batch bucket b: rows with active[r] == 1 advance, the
        others keep their position. max_pos: the newest position of any active row."""
        self.bufs.set_active(active)
        self._decode(b, max_pos, kind)

    # ---------------------------------------------------------------- step dispatch

    def _prefill(self, prompts: Sequence[Sequence[int]], lengths: list[int], b: int,
                 kind: str) -> list[int]:
        """Fit prompts to the planned shape, run the forward (replayed or eager), sample
        token 0. Returns each row's token-0 position (where the step publishes it)."""
        plan = self.runner.plan("prefill", b, max(lengths), kind)
        last = self.bufs.load_prompts(prompts, b, plan.length, PAD_ID)
        self.runner.run(plan)
        return [i + 1 for i in last]

    def _decode(self, b: int, max_pos: int, kind: str) -> None:
        """One decode step for rows [:b]; the newest token of any row sits at <= max_pos."""
        self.runner.run(self.runner.plan("decode", b, max_pos + 1, kind))

    # --------------------------------------------------------------------- capture

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
        return self.runner.capture_ahead(lengths, progress)

    def run_pending_captures(self, budget_s: float = 0.5) -> int:
        """Capture graphs that requests missed, for up to budget_s (call when idle)."""
        return self.runner.capture_pending(budget_s)

    # ----------------------------------------------------------------------- status

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "model": self.config.name, "mode": self.mode, "backend": self.ops.backend,
            "device": str(self.device), "dtype": str(self.dtype).removeprefix("torch."),
            "max_batch": self.max_batch, "max_seq_len": self.max_seq_len,
            "coverage": self.coverage, "requests_served": self.requests_served,
            "kernels": self.steps.kernels, "kernels_reason": self.steps_note or self.steps.kernels_reason,
            "tp": self.engine_config.tp,  # ranks; with tp > 1 this engine is rank 0's share
            "startup_s": {k: round(v, 3) for k, v in self.startup_s.items()},
            "allreduce": self.allreduce, "allreduce_reason": self.allreduce_reason,
        }
        graphs = self.runner.stats()
        if graphs is not None:
            out["graphs"] = graphs
        if self.device.type == "cuda":
            out["gpu_memory"] = {"allocated": torch.cuda.memory_allocated(self.device),
                                 "reserved": torch.cuda.memory_reserved(self.device),
                                 "total": torch.cuda.get_device_properties(self.device).total_memory}
        return out
