"""The Triton kernels on the CPU through Triton's interpreter (tests/triton_interpreter.py):
the GEMV's epilogues, decode attention, the glue kernels, and the per-row cache-row index
a short prefill uses; and the GEMV and attention kernels compiled for sm_90 by Triton's
real compiler (no GPU needed). The decode blocks built on them: test_fast_decode.py.
"""

from __future__ import annotations

import pytest
import torch

from tests.triton_interpreter import F16, TOL, nan, needs_interpreter, only_written, rnd


@pytest.fixture
def ws():
    from hybridgraph.kernels.workspace import Workspace
    return Workspace(1 << 18, 1024, "cpu")


@needs_interpreter
@pytest.mark.parametrize("b,n,k,split,programs,path", [
    (1, 100, 96, 1, 0, "dot"), (3, 64, 160, 3, 0, "dot"), (5, 200, 64, 2, 3, "dot"),
    (3, 64, 160, 3, 0, "swap"), (5, 200, 64, 2, 3, "swap"), (16, 100, 96, 1, 0, "swap"),
    (1, 100, 96, 1, 0, "reg"), (1, 64, 160, 3, 2, "reg"), (1, 100, 160, 2, 0, "reg")])
def test_gemv_norm_and_residual(ws, b, n, k, split, programs, path) -> None:
    """path: tensor cores (x @ W^T, or "swap": W @ x^T) or the one-row register path."""
    from hybridgraph.kernels import gemv as g
    from hybridgraph.kernels import reference as ref
    x, w, res, nw = rnd(b, k), rnd(n, k, scale=0.1), rnd(b, n), 1 + rnd(k, scale=0.2)
    half = 8 if path == "reg" and split == 2 else 16  # the register path's small tiles too
    cfg = g.GemvConfig(half=half, block_k=32, split_k=split, programs=programs,
                       dot=path != "reg", swap=path == "swap")
    out = g.gemv(x, w, nan(b, n), ws, cfg, norm_w=nw)
    assert ref.rel_err(out, ref.gemv_ref(x, w, nw)) < TOL
    out = g.gemv(x, w, nan(b, n), ws, cfg, epi=g.EPI_RESID, residual=res)
    assert ref.rel_err(out, ref.gemv_ref(x, w, residual=res)) < TOL
    assert int(ws.counters.abs().sum()) == 0  # every split launch leaves them at zero


@needs_interpreter
@pytest.mark.parametrize("b,split,path", [(1, 1, "reg"), (1, 3, "reg"), (3, 2, "swap")])
def test_gemv_float32_out_is_the_model_dtype_widened(ws, b, split, path) -> None:
    """The LM head writes float32 logits itself: each is the fp16 value the same GEMV
    gives into fp16, widened (what `model.output(...).float()` rounds), bit for bit."""
    from hybridgraph.kernels import gemv as g
    x, w, nw = rnd(b, 96), rnd(100, 96, scale=0.3), 1 + rnd(96, scale=0.2)
    cfg = g.GemvConfig(half=16, block_k=32, split_k=split, dot=path != "reg",
                       swap=path == "swap")
    wide = g.gemv(x, w, torch.full((b, 100), float("nan")), ws, cfg, norm_w=nw)
    narrow = g.gemv(x, w, nan(b, 100), ws, cfg, norm_w=nw)
    assert wide.dtype == torch.float32 and torch.equal(wide, narrow.float())


@needs_interpreter
@pytest.mark.parametrize("b,split,path", [(3, 1, "dot"), (3, 2, "dot"), (3, 2, "swap"),
                                          (1, 2, "reg")])
def test_gemv_swiglu_and_rope(ws, b, split, path) -> None:
    from hybridgraph.kernels import gemv as g
    from hybridgraph.kernels import reference as ref
    k, heads, kv, d, seq = 96, 6, 2, 32, 64
    x, nw = rnd(b, k), 1 + rnd(k, scale=0.2)
    cfg = g.GemvConfig(half=16, block_k=32, split_k=split, dot=path != "reg",
                       swap=path == "swap")
    w13 = rnd(2 * 40, k, scale=0.1)
    h = g.gemv(x, w13, nan(b, 40), ws, cfg, epi=g.EPI_SILU, norm_w=nw)
    assert ref.rel_err(h, ref.swiglu_ref(x, w13, nw)) < TOL
    wqkv = rnd((heads + 2 * kv) * d, k, scale=0.1)
    kc, vc = rnd(4, kv, seq, d), rnd(4, kv, seq, d)
    pos = torch.tensor([0, seq - 1, 17])[:b]
    cos, sin = _rope_inputs(seq, d)
    q = g.gemv(x, wqkv, nan(b, heads * d), ws, cfg, epi=g.EPI_ROPE, norm_w=nw,
               rope=g.RopeArgs(cos, sin, pos, kc, vc, heads, kv))
    q_ref, k_ref, v_ref = ref.qkv_rope_ref(x, wqkv, cos[pos], sin[pos], heads, kv, nw)
    rows = torch.arange(b)
    assert ref.rel_err(q, q_ref) < TOL
    assert ref.rel_err(kc[rows, :, pos], k_ref) < TOL
    assert ref.rel_err(vc[rows, :, pos], v_ref) < TOL


@needs_interpreter
@pytest.mark.parametrize("heads,kv,d", [(4, 4, 32), (6, 2, 32), (9, 3, 64)])
@pytest.mark.parametrize("splits", [1, 4])
def test_decode_attention(ws, heads, kv, d, splits) -> None:
    """Both ways of reading the keys: after the PDL wait, and early_kv (each split's first
    tile before it, the key at pos after), positions at both ends, on a tile's edges and
    in an empty split."""
    from hybridgraph.kernels import reference as ref
    from hybridgraph.kernels.attention import decode_attention
    b, seq, window = 5, 256, 128
    q, kc, vc = rnd(b, heads * d), rnd(b, kv, seq, d), rnd(b, kv, seq, d)
    pos = torch.tensor([0, window - 1, 40, 31, 32])
    for early_kv in (False, True):
        out = decode_attention(q, kc, vc, pos, window, nan(b, heads * d), ws, block_t=32,
                               splits=splits, early_kv=early_kv)
        assert ref.rel_err(out, ref.decode_attention_ref(q, kc, vc, pos, window)) < TOL
        assert int(ws.counters.abs().sum()) == 0


@needs_interpreter
def test_glue_kernels() -> None:
    from hybridgraph.kernels import glue
    from hybridgraph.kernels import reference as ref
    b, n = 3, 100
    x, res, nw = rnd(b, n), rnd(b, n), 1 + rnd(n, scale=0.2)
    xs, xn = nan(b, n), nan(b, n)
    glue.add_rmsnorm(x, nw, 1e-5, xn, residual=res, sum_out=xs)
    assert ref.rel_err(xn, ref.rmsnorm_ref(x.float() + res.float(), nw, 1e-5)) < TOL
    gu = rnd(b, 2 * 50)
    h = glue.silu_mul(gu, nan(b, 50))
    assert ref.rel_err(h, torch.nn.functional.silu(gu[:, :50].float()) * gu[:, 50:].float()) < TOL


@needs_interpreter
def test_add_rmsnorm_sums_the_parts_of_a_split_product() -> None:
    """x as [S, B, N] parts over K (model/fast_prefill.py): the sum of the parts, plus the
    residual, normed; a row stride other than N is refused, not misread."""
    from hybridgraph.kernels import glue
    from hybridgraph.kernels import reference as ref
    b, n = 3, 100
    parts, res, nw = rnd(4, b, n), rnd(b, n), 1 + rnd(n, scale=0.2)
    xs, xn = nan(b, n), nan(b, n)
    glue.add_rmsnorm(parts, nw, 1e-5, xn, residual=res, sum_out=xs)
    total = parts.float().sum(0) + res.float()
    assert ref.rel_err(xs, total) < TOL
    assert ref.rel_err(xn, ref.rmsnorm_ref(total, nw, 1e-5)) < TOL
    with pytest.raises(ValueError, match="rows must be contiguous"):
        glue.add_rmsnorm(rnd(b, 2 * n)[:, :n], nw, 1e-5, xn)


# ------------------------------------------------ per-row cache rows (short prefills)

def _rope_inputs(positions: int, d: int):
    """RoPE tables [positions, d] of random angles: a row read for the wrong position
    shows."""
    ang = torch.rand(positions, d // 2) * 6
    return ang.cos().repeat(1, 2).to(F16), ang.sin().repeat(1, 2).to(F16)


@needs_interpreter
@pytest.mark.parametrize("b,split,dot,rows", [
    (3, 1, True, [2, 0, 3]), (3, 2, True, "shared"), (1, 2, False, [3]), (5, 1, True, "shared")])
def test_gemv_rope_writes_the_named_cache_rows(ws, b, split, dot, rows) -> None:
    """RopeArgs.cache_rows: row i writes k and v into cache row cache_rows[i] at pos[i]
    (a permutation, or one row for all given with stride 0, as a prefill passes it); q is
    unchanged and nothing else in the caches moves."""
    from hybridgraph.kernels import gemv as g
    from hybridgraph.kernels import reference as ref
    k, heads, kv, d, seq = 96, 6, 2, 32, 64
    x, nw = rnd(b, k), 1 + rnd(k, scale=0.2)
    wqkv = rnd((heads + 2 * kv) * d, k, scale=0.1)
    kc, vc = rnd(6, kv, seq, d), rnd(6, kv, seq, d)
    kc0, vc0 = kc.clone(), vc.clone()
    pos = torch.tensor([0, seq - 1, 17, 5, 6])[:b]
    crow = torch.tensor([1]).expand(b) if rows == "shared" else torch.tensor(rows)
    cos, sin = _rope_inputs(seq, d)
    cfg = g.GemvConfig(half=16, block_k=32, split_k=split, dot=dot)
    q = g.gemv(x, wqkv, nan(b, heads * d), ws, cfg, epi=g.EPI_ROPE, norm_w=nw,
               rope=g.RopeArgs(cos, sin, pos, kc, vc, heads, kv, crow))
    q_ref, k_ref, v_ref = ref.qkv_rope_ref(x, wqkv, cos[pos], sin[pos], heads, kv, nw)
    assert ref.rel_err(q, q_ref) < TOL
    assert ref.rel_err(kc[crow, :, pos], k_ref) < TOL
    assert ref.rel_err(vc[crow, :, pos], v_ref) < TOL
    assert only_written(kc0, kc, crow, pos) and only_written(vc0, vc, crow, pos)
    # None keeps today's mapping: row i writes cache row i.
    kc.copy_(kc0)
    g.gemv(x, wqkv, nan(b, heads * d), ws, cfg, epi=g.EPI_ROPE, norm_w=nw,
           rope=g.RopeArgs(cos, sin, pos, kc, vc, heads, kv))
    assert only_written(kc0, kc, torch.arange(b), pos)
    assert int(ws.counters.abs().sum()) == 0


@needs_interpreter
@pytest.mark.parametrize("batch,kv,window,want", [
    (1, 32, 512, 4), (1, 32, 1024, 8), (1, 32, 2048, 16), (1, 32, 4096, 16),  # llama-2-7b
    (1, 8, 512, 4), (1, 8, 2048, 16), (1, 8, 8192, 64),                      # llama-3.2-1b
    (1, 8, 64, 1), (1, 8, 256, 2), (16, 8, 4096, 4)])
def test_attention_splits_keep_two_tiles_a_split_and_cover_the_gpu_twice(batch, kv, window,
                                                                         want) -> None:
    from hybridgraph.kernels.attention import attention_splits
    assert attention_splits(batch, kv, window, 64) == want


def test_early_kv_splits_to_one_tile_where_the_kv_rows_are_narrow() -> None:
    from hybridgraph.kernels.attention import attention_splits, early_kv_pays
    assert early_kv_pays(4, 64) and early_kv_pays(8, 64)   # tinyllama, llama-3.2-1b
    assert not early_kv_pays(32, 128)                      # llama-2-7b
    assert attention_splits(1, 4, 512, 64, min_tiles=1) == 8    # one 64-key tile each
    assert attention_splits(1, 4, 512, 64) == 4                 # two tiles each
    assert attention_splits(1, 32, 4096, 64, min_tiles=1) == 16  # covering the GPU twice


@pytest.mark.parametrize("splits", [1, 4])
def test_decode_attention_reads_the_named_cache_rows(ws, splits) -> None:
    """cache_rows: row i attends to keys 0..pos[i] of cache row cache_rows[i] — rows of one
    sequence (a prefill's, stride 0) or any mapping — and None stays row i."""
    from hybridgraph.kernels import reference as ref
    from hybridgraph.kernels.attention import decode_attention
    heads, kv, d, seq, window, b = 6, 2, 32, 256, 128, 4
    q, kc, vc = rnd(b, heads * d), rnd(4, kv, seq, d), rnd(4, kv, seq, d)
    pos = torch.tensor([0, 3, window - 1, 40])
    for crow in (torch.tensor([2]).expand(b), torch.tensor([3, 0, 2, 2])):
        out = decode_attention(q, kc, vc, pos, window, nan(b, heads * d), ws, block_t=32,
                               splits=splits, cache_rows=crow)
        expect = ref.decode_attention_ref(q, kc[crow], vc[crow], pos, window)
        assert ref.rel_err(out, expect) < TOL
        other = ref.decode_attention_ref(q, kc, vc, pos, window)
        assert ref.rel_err(out, other) > 10 * TOL  # the index is honoured, not ignored
    out = decode_attention(q, kc, vc, pos, window, nan(b, heads * d), ws, block_t=32,
                           splits=splits)
    assert ref.rel_err(out, ref.decode_attention_ref(q, kc, vc, pos, window)) < TOL
    assert int(ws.counters.abs().sum()) == 0


@needs_interpreter
@pytest.mark.parametrize("heads,kv", [(4, 4), (6, 2), (9, 3)])
@pytest.mark.parametrize("splits", [1, 4])
def test_decode_attention_takes_a_prompts_rows_a_group_a_program(ws, heads, kv, splits) -> None:
    """A prompt's rows (cache_rows of stride 0) several to a program: each row still counts
    only the keys up to its own position, also in tiles and splits where an early row of
    the group counts none; a partial last group (padding rows) writes nothing past B."""
    from hybridgraph.kernels import reference as ref
    from hybridgraph.kernels.attention import decode_attention, prompt_rows
    d, seq, window, b = 32, 256, 128, 12
    q, kc, vc = rnd(b, heads * d), rnd(3, kv, seq, d), rnd(3, kv, seq, d)
    pos = torch.arange(b) * 10 + torch.tensor([0] * 11 + [7])  # 0, 10, .., 100, 117
    crow = torch.tensor([1]).expand(b)
    expect = ref.decode_attention_ref(q, kc[crow], vc[crow], pos, window)
    for rows in (None, 1, 5, b):
        out = nan(b + 1, heads * d)
        decode_attention(q, kc, vc, pos, window, out[:b], ws, block_t=32, splits=splits,
                         cache_rows=crow, rows_per_program=rows)
        assert ref.rel_err(out[:b], expect) < TOL, rows
        assert out[b].isnan().all()
        assert int(ws.counters.abs().sum()) == 0
    assert prompt_rows(heads // kv, b) == min(b, 16 // (heads // kv))
    with pytest.raises(ValueError, match="stride 0"):
        decode_attention(q, kc, vc, pos, window, nan(b, heads * d), ws,
                         cache_rows=torch.ones(b, dtype=torch.int64), rows_per_program=2)


@needs_interpreter
@pytest.mark.parametrize("hb", [None, 4, 16])  # one head a program; a partial last; all
def test_rope_kv_writes_the_named_cache_row(hb: int | None) -> None:
    from hybridgraph.kernels import glue
    from hybridgraph.kernels import reference as ref
    b, heads, kv, d, seq = 5, 6, 2, 32, 64
    qkv = rnd(b, (heads + 2 * kv) * d)
    kc, vc = rnd(3, kv, seq, d), rnd(3, kv, seq, d)
    kc0, vc0 = kc.clone(), vc.clone()
    pos, crow = torch.arange(b) + 3, torch.tensor([2]).expand(b)
    tc, ts = _rope_inputs(seq, d)
    q = glue.rope_kv(qkv, tc, ts, pos, kc, vc, nan(b, heads * d), heads, kv, cache_rows=crow,
                     heads_per_program=hb)
    cos, sin = tc[pos], ts[pos]
    qf, kf, _ = qkv.float().split([heads * d, kv * d, kv * d], dim=-1)
    assert ref.rel_err(q, ref.rope_ref(qf.view(b, heads, d), cos, sin).reshape(b, -1)) < TOL
    assert ref.rel_err(kc[2, :, 3:3 + b].transpose(0, 1),
                       ref.rope_ref(kf.view(b, kv, d), cos, sin)) < TOL
    assert torch.equal(vc[2, :, 3:3 + b].transpose(0, 1),
                       qkv[:, (heads + kv) * d:].view(b, kv, d))
    assert only_written(kc0, kc, crow, pos) and only_written(vc0, vc, crow, pos)


@needs_interpreter
@pytest.mark.parametrize("hb", [None, 4])
def test_rope_kv_in_place_rotates_q_and_k_inside_qkv(hb: int | None) -> None:
    """q_out=None (the glue prefill): q and k rotated in qkv itself, v left as it was, and
    the cache written exactly as with a q_out."""
    from hybridgraph.kernels import glue
    from hybridgraph.kernels import reference as ref
    b, heads, kv, d, seq = 5, 6, 2, 32, 64
    qkv = rnd(b, (heads + 2 * kv) * d)
    qf, kf, vf = qkv.float().split([heads * d, kv * d, kv * d], dim=-1)
    kc, vc = rnd(3, kv, seq, d), rnd(3, kv, seq, d)
    kc0, vc0 = kc.clone(), vc.clone()
    pos, crow = torch.arange(b), torch.tensor([1]).expand(b)
    tc, ts = _rope_inputs(seq, d)
    out = glue.rope_kv(qkv, tc, ts, pos, kc, vc, None, heads, kv, cache_rows=crow,
                       heads_per_program=hb)
    assert out is qkv
    cos, sin = tc[pos], ts[pos]
    q_ref = ref.rope_ref(qf.view(b, heads, d), cos, sin).reshape(b, -1)
    k_ref = ref.rope_ref(kf.view(b, kv, d), cos, sin)
    assert ref.rel_err(qkv[:, :heads * d], q_ref) < TOL
    assert ref.rel_err(qkv[:, heads * d:(heads + kv) * d].view(b, kv, d), k_ref) < TOL
    assert torch.equal(qkv[:, (heads + kv) * d:].float(), vf)
    assert torch.equal(kc[1, :, :b].transpose(0, 1), qkv[:, heads * d:(heads + kv) * d]
                       .view(b, kv, d))
    assert torch.equal(vc[1, :, :b].transpose(0, 1), qkv[:, (heads + kv) * d:].view(b, kv, d))
    assert only_written(kc0, kc, crow, pos) and only_written(vc0, vc, crow, pos)


def test_rope_heads_per_program_grows_with_rows() -> None:
    from hybridgraph.kernels.glue import rope_heads_per_program
    assert rope_heads_per_program(1, 96) == 1      # a decode row: every head its own program
    assert rope_heads_per_program(16, 96) == 1
    assert rope_heads_per_program(500, 96) == 16   # a long prefill: 6 programs a row
    assert rope_heads_per_program(64, 40) == 2     # >= 1024 programs kept while it doubles


def test_rope_tables_must_be_whole_tables() -> None:
    """The kernels read row pos[b] of the model's tables; per-row [B, 1, D] slices (what
    Block.decode takes) are refused by name, not read out of bounds."""
    from hybridgraph.kernels.attention import check_rope_tables
    table = torch.zeros(64, 32, dtype=F16)
    check_rope_tables(table, table, 32, "x")
    for bad in (table[:3, None], table[:, :16], table.t().contiguous().t()):
        with pytest.raises(ValueError, match="x: cos and sin must be contiguous"):
            check_rope_tables(bad, table, 32, "x")


def test_cache_rows_must_be_an_index_vector() -> None:
    from hybridgraph.kernels.attention import check_cache_rows
    check_cache_rows(torch.tensor([1]).expand(4), 4, "x")
    for bad in (torch.tensor([1, 2]), torch.zeros(4), torch.zeros(2, 2, dtype=torch.int64)):
        with pytest.raises(ValueError, match="x: cache_rows"):
            check_cache_rows(bad, 4, "x")


_GEMV_ARGS = [("x_ptr", "*fp16"), ("w_ptr", "*fp16"), ("normw_ptr", "*fp16"),
              ("out_ptr", "*fp16"), ("res_ptr", "*fp16"), ("cos_ptr", "*fp16"),
              ("sin_ptr", "*fp16"), ("pos_ptr", "*i64"), ("kc_ptr", "*fp16"),
              ("vc_ptr", "*fp16"), ("ws_ptr", "*fp32"), ("cnt_ptr", "*i32")] + \
    [(n, "i32") for n in ("B", "N", "K", "K_SPLIT", "TILES")] + [("eps", "fp32")] + \
    [(n, "i32") for n in ("stride_x", "stride_out", "stride_res", "HEADS", "KV_HEADS",
                          "MAX_SEQ", "D_HALF")] + [("crow_ptr", "*i64"), ("stride_crow", "i32")]


def _gemv_variant(cfg, rows: int, epi: int, norm: bool, pdl: int = 2, split: int = 1,
                  persist: bool = False, crow: bool = False, out: str = "*fp16"):
    dot = rows > 1 and cfg.dot
    return (dict(_GEMV_ARGS) | {"out_ptr": out}, dict(
        NORM=norm, EPI=epi, SPLIT_K=split, BLOCK_B=16 if dot else 1, HALF=cfg.half,
        BLOCK_K=cfg.block_k, PREFETCH=cfg.prefetch, USE_PDL=pdl, DOT=dot, PERSIST=persist,
        HAS_CROW=crow, SWAP=dot and cfg.swap), {"num_stages": cfg.num_stages})


@needs_interpreter
def test_gemv_and_attention_compile_for_hopper() -> None:
    """The real compiler, for sm_90, on the CPU (the interpreter accepts code it refuses):
    the one-row register path, the batched rule's tiles and every epilogue. And the
    premise of the batched rule for norm'd projections: swapped, its tile is the
    warpgroup MMA's M side, so it compiles to wgmma, where x @ W^T (16 rows of x on M)
    gets only Ampere's mma.sync (KERNELS.md run 13)."""
    from hybridgraph.kernels import gemv as g
    from tests.triton_interpreter import compile_for_hopper
    one = g.default_config(4096, 4096, epi=g.EPI_RESID)
    normed = g.default_config(4096, 4096, norm=True, rows=10)
    plain = g.default_config(4096, 4096, rows=10)
    variants = [_gemv_variant(one, 1, g.EPI_RESID, False, split=2),
                _gemv_variant(one, 1, g.EPI_SILU, True, pdl=1, persist=True),
                _gemv_variant(one._replace(half=16), 1, g.EPI_ROPE, True, crow=True),
                _gemv_variant(normed, 10, g.EPI_PLAIN, True),
                _gemv_variant(normed._replace(half=64), 10, g.EPI_ROPE, True, crow=True),
                _gemv_variant(normed, 10, g.EPI_SILU, True, pdl=0),
                _gemv_variant(plain, 10, g.EPI_RESID, False, split=plain.split_k),
                _gemv_variant(one, 1, g.EPI_PLAIN, True, split=2, out="*fp32")]  # the head
    err, mmas = compile_for_hopper("hybridgraph.kernels.gemv", "gemv_kernel", variants)
    assert err == "", err
    assert mmas[0] == mmas[1] == mmas[2] == mmas[7] == (0, 0)  # registers, no tensor cores
    assert all(wg > 0 and sync == 0 for wg, sync in mmas[3:6]), mmas
    assert mmas[6][0] == 0 and mmas[6][1] > 0, mmas           # unswapped: mma.sync

    att = {"q_ptr": "*fp16", "kc_ptr": "*fp16", "vc_ptr": "*fp16", "pos_ptr": "*i64",
           "out_ptr": "*fp16", "ws_ptr": "*fp32", "cnt_ptr": "*i32", "crow_ptr": "*i64",
           "stride_crow": "i32", "scale": "fp32", "WINDOW": "i32", "KV_HEADS": "i32",
           "MAX_SEQ": "i32", "CHUNK": "i32", "N_ROWS": "i32"}
    variants = [(att, dict(REP=rep, D=d, D_PAD=d, BLOCK_R=16, BLOCK_T=64, SPLITS=splits,
                           USE_PDL=pdl, HAS_CROW=crow, EARLY_KV=early, ROWS=rows), {})
                for rep, d, splits, pdl, crow, early, rows in (
                    (4, 128, 1, 1, False, False, 1), (1, 128, 4, 2, True, False, 1),
                    (3, 64, 8, 0, False, False, 1), (8, 64, 2, 1, False, True, 1),
                    (1, 128, 1, 2, False, True, 1), (1, 128, 1, 1, True, False, 16),
                    (4, 64, 2, 1, True, False, 4))]
    err, _ = compile_for_hopper("hybridgraph.kernels.attention", "decode_attention_kernel",
                                variants)
    assert err == "", err
