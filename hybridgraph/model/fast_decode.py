"""The decode block on the Triton kernels: a drop-in for `Block.decode`, ~5 launches a layer.

With every projection on the Triton GEMV, one layer is five launches:
  1. QKV GEMV: RMSNorm in; RoPE out, k and v written into the cache at pos
  2. flash-decoding attention (split over keys, combined in the same launch)
  3. O GEMV: + residual out
  4. gate/up GEMV: RMSNorm in; silu(gate) * up out
  5. down GEMV: + residual out
A projection may instead stay on cuBLAS (`KernelPlan`), with the elementwise work around
it fused into one Triton kernel (glue.py): the plan is whichever measured faster
(docs/KERNELS.md). Every intermediate is rounded to the model dtype where the PyTorch
block rounds it, so the two blocks agree to fp16/bf16 rounding.

On a tensor-parallel rank (`Block.all_reduce` set) O and down give a partial sum that is
summed over the ranks before the residual add, so they run plain and the add follows the
all-reduce (`_reduced_tail`): in the next norm kernel where gate/up is on cuBLAS, else
inside the all-reduce where the group fuses it (`Block.reduce_add`, the one-shot kernel),
else a plain add.

A one-prompt prefill of at most 16 tokens runs on the same blocks (`prefill`): its tokens
are decode rows at positions 0..T-1 of one cache row.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from hybridgraph.model.kernel_plan import MAX_ROWS, PROJECTIONS, KernelPlan, plan_on
from hybridgraph.model.llama import Block, KVCache, Transformer, no_reduce

if TYPE_CHECKING:
    from hybridgraph.kernels.gemv_config import GemvConfig
    from hybridgraph.kernels.publish import Finish


class TritonDecode:
    """Decode blocks of one model on the Triton kernels; `forward` is Transformer.decode
    and `block` Block.decode, except that the block takes the whole RoPE tables."""

    def __init__(self, model: Transformer, max_batch: int, plan: KernelPlan | None = None,
                 ) -> None:
        from hybridgraph.kernels import argmax, attention, ffn, gemv, sampling
        from hybridgraph.kernels.workspace import Workspace

        self._gemv, self._attn, self._argmax, self._sampling = gemv, attention, argmax, sampling
        self._ffn = ffn
        plan = plan_on(model.tok_embeddings.weight.device, plan)
        self.model, self.plan = model, plan
        self._pdl = (2 if self.plan.pdl_late else 1) if self.plan.pdl else 0
        cfg = model.config
        # The GEMV serves at most 16 rows; Steps runs larger batches on the model's blocks.
        self.rows = min(max_batch, plan.max_rows, MAX_ROWS)
        self.prefill_rows = plan.prefill_rows  # validated <= MAX_ROWS by KernelPlan
        if self.rows < 1:
            raise ValueError(f"KernelPlan.max_rows {plan.max_rows}: must be >= 1")
        self.heads, self.kv, self.d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.eps = cfg.rms_norm_eps
        self.early_kv = (attention.early_kv_pays(self.kv, self.d) if plan.early_kv is None
                         else plan.early_kv)
        if "qkv" in plan.uses(2) and gemv.rope_half(self.d // 2, 128) < 16:
            # The batched QKV's RoPE row sets divide D/2 and tl.dot needs >= 16 rows: a head
            # dim under 32 (test-sized models) takes cuBLAS + glue for 2+ rows.
            plan = replace(plan, gemv_batched=tuple(p for p in plan.uses(2) if p != "qkv"))
            self.plan = plan
        dev = model.tok_embeddings.weight.device
        self.sms = torch.cuda.get_device_properties(dev).multi_processor_count \
            if dev.type == "cuda" else 132
        shapes = {"qkv": ((self.heads + 2 * self.kv) * self.d, cfg.hidden_size, gemv.EPI_ROPE),
                  "wo": (cfg.hidden_size, self.heads * self.d, gemv.EPI_RESID),
                  "w13": (cfg.intermediate_size, cfg.hidden_size, gemv.EPI_SILU),
                  "w2": (cfg.hidden_size, cfg.intermediate_size, gemv.EPI_RESID),
                  "head": (cfg.vocab_size, cfg.hidden_size, gemv.EPI_PLAIN)}
        # A tensor-parallel rank runs O and down with EPI_PLAIN: the same config and tiles.
        self.configs: dict[str, gemv.GemvConfig] = {}
        batched: dict[str, gemv.GemvConfig] = {}  # each projection's 2-16-row rule
        floats, counters = 0, 0
        for name in dict.fromkeys(self.plan.gemv + (self.plan.gemv_batched or ())):
            n, k, epi = shapes[name]
            rope = epi == gemv.EPI_ROPE
            norm = name in ("qkv", "w13", "head")
            c = self.plan.configs.get(name)
            if c is None:
                c = gemv.default_config(n, k, self.sms, epi, norm=norm, d_half=self.d // 2)
                if name == "w2":  # down inside the fused feed-forward, where it fuses
                    fused = gemv.ffn_down_config(n, k, self.sms)
                    c = fused if self._fuses_ffn(fused) else c
            if self.plan.prefetch is not None:
                c = c._replace(prefetch=self.plan.prefetch)
            if name == "wo" and not c.dot:  # attention leaves HBM idle: prefetch more
                wpf = self.plan.wo_prefetch
                c = c._replace(prefetch=gemv.idle_prefetch(k, c) if wpf is None else wpf)
            self.configs[name] = c
            # Sized for the config and for its multi-row rule (gemv swaps a one-row
            # register config for the batched tensor-core config when more rows come).
            batched[name] = gemv.default_config(n, k, self.sms, epi, norm=norm,
                                                d_half=self.d // 2, rows=2)
            for cc in (c, batched[name]):
                half = gemv.rope_half(self.d // 2, cc.half) if rope else cc.half
                tiles = gemv.n_tiles(epi, n, half, self.d // 2)
                floats = max(floats, gemv.workspace_floats(tiles, cc.split_k, half))
                counters = max(counters, tiles)
        # A kernel prefill's O (2-16 rows) launches early as a one-row step's does, on the
        # batched tiles with the one-row config's idle prefetch (KERNELS.md run 30).
        wo = self.configs.get("wo")
        self.prefill_wo = wo if wo is None or wo.dot else \
            batched["wo"]._replace(prefetch=wo.prefetch)
        self.fused_ffn = "w2" in self.configs and self._fuses_ffn(self.configs["w2"])
        if self.fused_ffn:
            f, c = ffn.workspace_need(cfg.hidden_size, self.configs["w2"],
                                      cfg.intermediate_size)
            floats, counters = max(floats, f), max(counters, c)
        d_pad = max(16, 1 << (self.d - 1).bit_length())
        rep_pad = max(16, 1 << (self.heads // self.kv - 1).bit_length())
        # attention_splits keeps batch * kv * splits under 4 * SMs whenever it splits.
        floats = max(floats, 4 * self.sms * rep_pad * (d_pad + 2))
        counters = max(counters, max(self.rows, self.prefill_rows) * self.kv)
        # The samplers serve every batch, up to max_batch rows (not only self.rows).
        floats = max(floats, 3 * max_batch * argmax.SPLITS_MAX)
        counters = max(counters, max_batch)
        self.ws = Workspace(floats, counters, dev)
        # A prefill's positions 0..T-1, allocated before any capture (fixed address).
        self.positions = torch.arange(max(1, model.max_seq, self.prefill_rows), device=dev)

    def forward(self, ids: Tensor, pos: Tensor, window: int) -> Tensor:
        """Transformer.decode on the kernels; with "head" in the plan the final norm and the
        LM head are one GEMV too. Returns [B, V] float32 logits (B <= self.rows)."""
        if ids.shape[0] > self.rows:
            raise ValueError(f"TritonDecode serves {self.rows} rows, got {ids.shape[0]}")
        m = self.model
        x = m.tok_embeddings(ids)[:, None]
        for layer, cache in zip(m.layers, m.caches, strict=True):
            x = self.block(layer, x, m.rope_cos, m.rope_sin, cache, pos, window)
        if "head" not in self.plan.uses(ids.shape[0]):
            return m.output(m.norm(x[:, 0])).float()
        return self.head_logits(x[:, 0])

    def _fuses_ffn(self, down: GemvConfig) -> bool:
        """Whether one-row steps run gate/up and down (with config `down`) as one launch
        (kernels/ffn.py): planned, both on the GEMV and their configs allow it. On a
        tensor-parallel rank down's output is plain, summed over the ranks after it."""
        cfg, gemvs = self.model.config, self.plan.gemv
        return (self.plan.fuse_ffn and "w13" in gemvs and "w2" in gemvs
                and "w13" in self.configs
                and self._ffn.fusable(cfg.hidden_size, cfg.intermediate_size,
                                      self.configs["w13"], down))

    def gemv_launches(self, rows: int) -> list[str]:
        """The projection of each GEMV launch one `rows`-row `forward` makes, in launch
        order (`bench profile` names each traced launch by its place; "w13+w2" is the
        fused feed-forward)."""
        uses = self.plan.uses(rows)
        layer = [p for p in PROJECTIONS if p != "head" and p in uses]
        if rows == 1 and self.fused_ffn:
            layer = [p for p in layer if p not in ("w13", "w2")] + ["w13+w2"]
        return layer * len(self.model.layers) + (["head"] if "head" in uses else [])

    def prefill(self, ids: Tensor, cache_row: Tensor, last_idx: Tensor) -> Tensor:
        """Transformer.prefill of ONE prompt of T <= prefill_rows tokens on the decode kernels.

        Short prefills are weight-bound like a decode step, so the prompt runs as T decode
        rows at positions 0..T-1 that all write and read one KV-cache row: row t's decode
        attention over keys 0..t is exactly the prefill's causal attention (the QKV launch
        writes every row's key before the attention launch reads any). Padding past the
        prompt's last token writes keys at positions > last_idx, as Transformer.prefill
        does; decode writes each position before it reads it, so they are never seen.

        ids: [T] or [1, T]; cache_row: the cache row written (an int tensor of one element);
        last_idx: the row whose logits are returned (int tensor of one element). The final
        norm and the LM head run on that row only. Returns [1, V] float32 logits.
        """
        if ids.dim() == 2:
            if ids.shape[0] != 1:
                raise ValueError(f"TritonDecode.prefill: ids holds {ids.shape[0]} prompts; "
                                 "it serves one")
            ids = ids[0]
        t = ids.shape[0]
        m = self.model
        max_seq = m.max_seq
        if not 1 <= t <= min(self.prefill_rows, max_seq):
            raise ValueError(f"TritonDecode.prefill serves 1..{min(self.prefill_rows, max_seq)} "
                             f"tokens (KernelPlan.prefill_rows), got {t}")
        if cache_row.numel() != 1 or last_idx.numel() != 1:
            raise ValueError("TritonDecode.prefill: cache_row and last_idx must each hold one "
                             f"index, got {tuple(cache_row.shape)} and {tuple(last_idx.shape)}")
        window = prefill_window(t, max_seq)
        pos = self.positions[:t]
        rows = cache_row.reshape(1).expand(t)  # stride 0: every row names the one cache row
        x = m.tok_embeddings(ids)[:, None]
        for layer, cache in zip(m.layers, m.caches, strict=True):
            x = self.block(layer, x, m.rope_cos, m.rope_sin, cache, pos, window,
                           cache_rows=rows)
        x = x[:, 0].index_select(0, last_idx.reshape(1))
        if "head" not in self.plan.uses(1):
            return m.output(m.norm(x)).float()
        return self.head_logits(x)

    def greedy(self, logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor,
               seed: Tensor, counter: Tensor, out: Tensor | None = None) -> Tensor:
        """The greedy sampler as one launch (kernels/argmax.py): torch.argmax's tokens, the
        other parameters unread (every sampler has one signature). Inductor's argmax took
        7.5 µs a call in a graph at vocab 32000 and 22.8 at 128256, this one 4.0 and 4.6,
        and it needs no Dynamo frame at start-up (H100, scripts/argmax_bench.py). Given
        out, the tokens are written there (the step's token buffer: no copy after it)."""
        if out is None:
            out = torch.empty(logits.shape[0], dtype=torch.int64, device=logits.device)
        return self._argmax.argmax(logits, out, self.ws, pdl=self._pdl != 0)

    def greedy_finish(self, logits: Tensor, out: Tensor, finish: Finish) -> Tensor:
        """`greedy` and the rest of a step's finish in its one launch: out and
        finish.pos_out are the step's whole buffers, each row's position advances and its
        token is published for the host (kernels/publish.py Finish; Steps.finish_*)."""
        return self._argmax.argmax(logits, out, self.ws, pdl=self._pdl != 0, finish=finish)

    def sample(self, logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor,
               seed: Tensor, counter: Tensor, out: Tensor | None = None) -> Tensor:
        """runtime.dynamic.sample's draws on kernels/sampling.py (a sort, the argmax kernel,
        two split kernels): 64-75 µs a call in a graph against the compiled sampler's 95-203
        at vocab 32000-128256, one row, and no Dynamo frame at start-up (H100, run 18).
        Given out, the tokens are written there."""
        if out is None:
            out = torch.empty(logits.shape[0], dtype=torch.int64, device=logits.device)
        return self._sampling.sample(logits, temperature, top_k, top_p, seed, counter, out,
                                     self.ws, pdl=self._pdl != 0)

    def check(self) -> tuple[bool, str]:
        """The self-check of these kernels on this device, dtype and PDL (waits for it)."""
        from hybridgraph.kernels.selfcheck import check_kernels
        w = self.model.tok_embeddings.weight
        return check_kernels(w.device, w.dtype, self.plan.pdl)

    def head_logits(self, x: Tensor) -> Tensor:
        """The final norm and the LM head as one GEMV (norm prologue). x: [B, hidden];
        returns [B, V] float32 logits, written by the GEMV itself (rounded to the model
        dtype first, as `m.output(...).float()` rounds them): no copy launch after it."""
        m = self.model
        logits = torch.empty(x.shape[0], m.output.weight.shape[0], dtype=torch.float32,
                             device=x.device)
        return self._gemv.gemv(x, m.output.weight, logits, self.ws, self.configs["head"],
                               norm_w=m.norm.weight, eps=self.eps, pdl=self._pdl)

    def block(self, layer: Block, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache,
              pos: Tensor, window: int, cache_rows: Tensor | None = None) -> Tensor:
        """Block.decode on the kernels. x: [B, 1, hidden]; cos, sin: the model's RoPE
        tables [P, D] (Block.decode takes each row's [B, 1, D]): the QKV launch reads row
        pos[b] itself, so a step launches no gather. cache_rows: [B], the cache row each row
        writes and reads (None: row b; `prefill` passes one row for all)."""
        g, pdl = self._gemv, self._pdl
        b, hidden = x.shape[0], x.shape[-1]
        on_gemv = self.plan.uses(b)
        x2 = x.reshape(b, hidden)
        att, ff = layer.attention, layer.feed_forward
        new = x2.new_empty
        q = new(b, self.heads * self.d)
        if "qkv" in on_gemv:
            g.gemv(x2, att.wqkv.weight, q, self.ws, self.configs["qkv"], epi=g.EPI_ROPE,
                   norm_w=layer.attention_norm.weight, eps=self.eps, pdl=pdl,
                   rope=g.RopeArgs(cos, sin, pos, cache.k, cache.v, self.heads, self.kv,
                                   cache_rows))
        else:
            from hybridgraph.kernels import glue
            xn = glue.add_rmsnorm(x2, layer.attention_norm.weight, self.eps, new(b, hidden),
                                  pdl=pdl)
            glue.rope_kv(F.linear(xn, att.wqkv.weight), cos, sin, pos, cache.k, cache.v, q,
                         self.heads, self.kv, pdl=pdl, cache_rows=cache_rows)
        # One row, or a prompt's rows in a kernel prefill: the O GEMV may launch at once and
        # prefetch its weights while attention runs (HBM is idle then). In a batch of decode
        # rows that cost more than it gave (run 10); a 10-token prefill gained 1-2% (run 30).
        prefill = cache_rows is not None and b > 1
        early = self.plan.attn_early and pdl and (b == 1 or prefill) and "wo" in on_gemv
        wo_cfg = self.prefill_wo if prefill else self.configs.get("wo")
        o = self._attn.decode_attention(q, cache.k, cache.v, pos, window, new(q.shape),
                                        self.ws, block_t=self.plan.block_t,
                                        num_warps=self.plan.attn_warps,
                                        splits=self.plan.attn_splits,
                                        pdl=1 if early else pdl, cache_rows=cache_rows,
                                        early_kv=self.early_kv)
        if layer.all_reduce is not no_reduce:  # a tensor-parallel rank
            return self._reduced_tail(layer, x2, o, on_gemv, wo_cfg).view(b, 1, hidden)
        inter = ff.w2.weight.shape[1]
        h = new(b, inter)
        if "w13" in on_gemv:
            if "wo" in on_gemv:
                x1 = g.gemv(o, att.wo.weight, new(b, hidden), self.ws, wo_cfg,
                            epi=g.EPI_RESID, residual=x2, pdl=pdl)
            else:
                x1 = x2 + F.linear(o, att.wo.weight)
            if b == 1 and self.fused_ffn:  # gate/up and down in one launch
                out = self._ffn.ffn(x1, ff.w13.weight, layer.ffn_norm.weight, ff.w2.weight,
                                    x1, h, new(b, hidden), self.ws, self.configs["w13"],
                                    self.configs["w2"], eps=self.eps, pdl=pdl)
                return out.view(b, 1, hidden)
            g.gemv(x1, ff.w13.weight, h, self.ws, self.configs["w13"], epi=g.EPI_SILU,
                   norm_w=layer.ffn_norm.weight, eps=self.eps, pdl=pdl)
        else:
            from hybridgraph.kernels import glue
            xn = new(b, hidden)
            if "wo" in on_gemv:
                x1 = g.gemv(o, att.wo.weight, new(b, hidden), self.ws, wo_cfg,
                            epi=g.EPI_RESID, residual=x2, pdl=pdl)
                glue.add_rmsnorm(x1, layer.ffn_norm.weight, self.eps, xn, pdl=pdl)
            else:  # the residual add rides in the norm kernel
                x1 = new(b, hidden)
                glue.add_rmsnorm(F.linear(o, att.wo.weight), layer.ffn_norm.weight, self.eps,
                                 xn, residual=x2, sum_out=x1, pdl=pdl)
            glue.silu_mul(F.linear(xn, ff.w13.weight), h, pdl=pdl)
        if "w2" in on_gemv:
            out = g.gemv(h, ff.w2.weight, new(b, hidden), self.ws, self.configs["w2"],
                         epi=g.EPI_RESID, residual=x1, pdl=pdl)
        else:
            out = x1 + F.linear(h, ff.w2.weight)
        return out.view(b, 1, hidden)

    def _reduced_tail(self, layer: Block, x2: Tensor, o: Tensor, on_gemv: tuple[str, ...],
                      wo_cfg: GemvConfig | None) -> Tensor:
        """The block after attention on a tensor-parallel rank: O and down return this
        rank's partial sum, which is summed over the ranks before the residual add, so
        neither GEMV may fuse the add (EPI_PLAIN) as the one-rank path does. Both adds go
        through `layer.reduce_add`: the one-shot kernel sums and adds in one launch, other
        all-reduces (and Block's default) reduce and then add, which rounds the same. Where
        gate/up is on cuBLAS the first add rides in its norm kernel instead. One row with the
        feed-forward fused runs it as one launch here too, down plain. Kept apart so the
        one-rank path (tuned) stays as it is. x2: [B, hidden]; o: [B, heads * D]; wo_cfg:
        O's config (a prefill's or the one-row one; None where O is not on the GEMV)."""
        g, pdl = self._gemv, self._pdl
        reduce, reduce_add = layer.all_reduce, layer.reduce_add
        att, ff = layer.attention, layer.feed_forward
        b, hidden = x2.shape
        new = x2.new_empty
        if "wo" in on_gemv:
            attn = g.gemv(o, att.wo.weight, new(b, hidden), self.ws, wo_cfg,
                          epi=g.EPI_PLAIN, pdl=pdl)
        else:
            attn = F.linear(o, att.wo.weight)
        h = new(b, ff.w2.weight.shape[1])
        if "w13" in on_gemv:  # the norm rides in the GEMV's prologue, the add in the reduce
            x1 = reduce_add(attn, x2)
            if b == 1 and self.fused_ffn:  # gate/up and down in one launch, down plain
                down = self._ffn.ffn(x1, ff.w13.weight, layer.ffn_norm.weight, ff.w2.weight,
                                     None, h, new(b, hidden), self.ws, self.configs["w13"],
                                     self.configs["w2"], eps=self.eps, pdl=pdl)
                return reduce_add(down, x1)
            g.gemv(x1, ff.w13.weight, h, self.ws, self.configs["w13"], epi=g.EPI_SILU,
                   norm_w=layer.ffn_norm.weight, eps=self.eps, pdl=pdl)
        else:  # the residual add rides in the norm kernel
            from hybridgraph.kernels import glue
            x1, xn = new(b, hidden), new(b, hidden)
            glue.add_rmsnorm(reduce(attn), layer.ffn_norm.weight, self.eps, xn, residual=x2,
                             sum_out=x1, pdl=pdl)
            glue.silu_mul(F.linear(xn, ff.w13.weight), h, pdl=pdl)
        if "w2" in on_gemv:
            down = g.gemv(h, ff.w2.weight, new(b, hidden), self.ws, self.configs["w2"],
                          epi=g.EPI_PLAIN, pdl=pdl)
        else:
            down = F.linear(h, ff.w2.weight)
        return reduce_add(down, x1)


def prefill_window(t: int, max_seq: int) -> int:
    """The attention window of a T-token kernel prefill: the smallest power of two >= T
    (decode's windows are powers of two too: runtime/runner.py), capped at the cache."""
    return min(1 << (t - 1).bit_length(), max_seq)


def triton_decode(model: Transformer, max_batch: int, plan: KernelPlan | None = None,
                  check: bool = True) -> tuple[TritonDecode | None, str]:
    """A TritonDecode for model when its kernels pass their self-check here, else
    (None, why). Asked for PDL where the GPU lacks it, the kernels run without it and the
    reason says so. check=False builds it without waiting for the check: the caller asks
    `TritonDecode.check` before the kernels run for real (Engine: after the dry pass)."""
    p = model.tok_embeddings.weight
    asked = plan or KernelPlan()
    plan = plan_on(p.device, asked)
    note = " (without PDL: it needs sm_90 or newer)" if asked.pdl and not plan.pdl else ""
    from hybridgraph.kernels.selfcheck import cannot_run, check_kernels
    if check:
        ok, reason = check_kernels(p.device, p.dtype, plan.pdl)
        why = None if ok else reason
    else:  # what is known without running a kernel; the rest from TritonDecode.check
        why = cannot_run(p.device, p.dtype, plan.pdl)
    if why is not None:
        return None, why
    if any(layer.all_reduce is not no_reduce for layer in model.layers):
        note += " (tensor parallel: O and down add the residual after the all-reduce)"
    try:
        return TritonDecode(model, max_batch, plan), "ok" + note
    except Exception as e:  # a shape the kernels do not serve
        return None, f"{type(e).__name__}: {e}"
