"""The one-shot all-reduce kernel (kernels/oneshot.py) in Triton's interpreter, on the CPU.

Each rank's launch runs for real (the pushes into the peers' buffers, the polls on its
own, the sum, the residual, the stores, the clears, the phase flip) against host buffers
standing in for its peers' symmetric memory; a thread plays the peers (pushes their parts,
takes the rank's: tests/triton_interpreter.HostRanks). What this checks: the arithmetic
(float32 sum in rank order, rounded, residual added as PyTorch rounds it: bit-equal to
`reference` and so to the same sum on every rank), the chunking (every element once, odd
sizes), the protocol from one rank's side (it waits for late peers, pushes what they
expect, leaves every slot empty, alternates phases), values that look like an empty slot,
and the launcher's refusals. Not checked here: ranks running at once on GPUs, memory
ordering across NVLink, CUDA graph replay, bfloat16 (the interpreter computes it
wrongly): tests/gpu/test_oneshot.py.
"""

from __future__ import annotations

import pytest
import torch

from tests.triton_interpreter import HostRanks, compile_for_hopper, needs_interpreter

oneshot = pytest.importorskip("hybridgraph.kernels.oneshot")

F16, F32 = torch.float16, torch.float32


def _parts(world: int, shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen).to(dtype) for _ in range(world)]


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _call(ranks: HostRanks, rank: int, x, out, residual=None):
    return oneshot.all_reduce(x, out, ranks.buffers[rank], ranks.buffer_ptrs, rank,
                              ranks.world, ranks.states[rank], residual)


def _run(ranks: HostRanks, rank: int, parts, residual=None, calls: int = 1):
    out = torch.empty_like(parts[rank])

    def launch():
        for _ in range(calls):
            _call(ranks, rank, parts[rank], out, residual)
        return out
    return ranks.run(rank, parts, launch, calls=calls)


@needs_interpreter
@pytest.mark.parametrize("dtype", [F16, F32])
@pytest.mark.parametrize("world,shape", [(2, (1, 4096)), (2, (3, 1001)), (4, (2, 2048))])
@pytest.mark.parametrize("with_residual", [False, True])
def test_every_rank_gets_the_reference_bit_for_bit(dtype, world, shape, with_residual) -> None:
    parts = _parts(world, shape, dtype)
    residual = _parts(1, shape, dtype, seed=9)[0] if with_residual else None
    want = oneshot.reference(parts, residual)
    ranks = HostRanks(world, _bytes(parts[0]))
    for rank in range(world):
        ranks.received.clear()
        got = _run(ranks, rank, parts, residual)
        assert torch.equal(got, want), (rank, (got.float() - want.float()).abs().max())
        # Every peer got this rank's part, and every slot is empty again.
        assert all(torch.equal(v, parts[rank].reshape(-1)) for v in ranks.received[0].values())
        assert sorted(ranks.received[0]) == [p for p in range(world) if p != rank]
        assert ranks.all_empty()
    # Against float64: the one rounding of the float32 sum, one of the dtype.
    exact = sum(p.double() for p in parts) + (residual.double() if with_residual else 0)
    tol = {F16: 4e-3, F32: 1e-5}[dtype] * exact.abs().max().item()
    assert (want.double() - exact).abs().max().item() <= tol


@needs_interpreter
def test_repeated_calls_alternate_phases_and_wait_for_late_peers() -> None:
    """Three calls in a row (a graph replayed), the peers 0.2 s late each time: every call
    waits for their pushes, uses the next phase's slots, and leaves them empty."""
    parts = _parts(2, (2, 1024), F16, seed=3)
    ranks = HostRanks(2, _bytes(parts[0]), delay_s=0.2)
    got = _run(ranks, 1, parts, calls=3)
    assert torch.equal(got, oneshot.reference(parts)) and ranks.all_empty()
    assert len(ranks.received) == 3 and ranks.states[1].tolist() == [1, 0]


@needs_interpreter
def test_a_call_touches_only_its_phase() -> None:
    """From phase 1, the call reads and clears phase 1's slots: a value planted in a
    phase-0 slot stays, and the phase flips back to 0."""
    parts = _parts(2, (1, 512), F32, seed=7)
    ranks = HostRanks(2, _bytes(parts[0]))
    planted = ranks.slot_view(1, 0, 0, 64)
    planted.view(F32).fill_(3.0)
    ranks.states[1].copy_(torch.tensor([1, 0]))
    got = _run(ranks, 1, parts)
    assert torch.equal(got, oneshot.reference(parts))
    assert ranks.states[1].tolist() == [0, 0]
    assert bool((planted.view(F32) == 3.0).all())


@needs_interpreter
@pytest.mark.parametrize("dtype,bits,sent", [
    (F16, -32768, 0),                      # float16 -0.0 is sent as +0.0
    (F32, -2147450880, -2147483648),       # float32 0x80008000 is sent as -0.0
])
def test_values_that_look_empty_are_sent_as_zero(dtype, bits, sent) -> None:
    """A part holding the EMPTY pattern must not leave its peer waiting forever: it goes
    out as a zero of the same sign class, on every rank alike."""
    parts = _parts(2, (1, 256), dtype, seed=8)
    ibits = torch.int16 if dtype == F16 else torch.int32
    parts[1].view(ibits)[0, :10] = bits
    ranks = HostRanks(2, _bytes(parts[0]))
    got = _run(ranks, 1, parts, residual=None)
    pushed = ranks.received[0][0].view(ibits)
    assert (pushed[:10] == sent).all() and torch.equal(pushed[10:], parts[1].view(ibits)[0, 10:])
    fixed = parts[1].clone()
    fixed.view(ibits)[0, :10] = sent
    assert torch.equal(got, oneshot.reference([parts[0], fixed])) and ranks.all_empty()


@needs_interpreter
def test_arithmetic_with_every_push_already_landed() -> None:
    """8 ranks, residual, peers' pushes already in rank 3's buffer: no thread is needed,
    and the call pushes rank 3's part into slot 3 of every peer."""
    parts = _parts(8, (5, 96), F32, seed=4)
    residual = _parts(1, (5, 96), F32, seed=5)[0]
    ranks = HostRanks(8, _bytes(parts[0]))
    for p in range(8):
        if p != 3:
            ranks.slot_view(3, 0, p, _bytes(parts[p])).view(F32).copy_(parts[p].reshape(-1))
    out = torch.empty_like(parts[0])
    _call(ranks, 3, parts[3], out, residual)
    assert torch.equal(out, oneshot.reference(parts, residual))
    for p in range(8):
        if p != 3:
            landed = ranks.slot_view(p, 0, 3, _bytes(parts[3])).view(F32)
            assert torch.equal(landed, parts[3].reshape(-1))
    own = ranks.buffers[3]
    assert bool((own[:own.numel() // 2 * 2].view(torch.int16) == -32768).all())


def test_reference_sums_in_float32_in_rank_order() -> None:
    a, b = torch.tensor([2048.0], dtype=F16), torch.tensor([1.0], dtype=F16)
    c = torch.tensor([1.0], dtype=F16)
    # fp16 pairwise: (2048 + 1) rounds to 2048, + 1 again 2048; float32 keeps 2050.
    assert oneshot.reference([a, b, c]).item() == 2050.0
    # With a residual the sum is rounded first (2049 -> 2048), then 2048 + 1 -> 2048 again.
    assert oneshot.reference([a, b], residual=c).item() == 2048.0


@pytest.mark.parametrize("nbytes,programs", [
    (8192, 4), (16384, 8), (64 * 4096 * 2, 32), (64 * 8192 * 4, 32), (2, 1)])
def test_launch_plan(nbytes: int, programs: int) -> None:
    for size in (2, 4):
        numel = max(1, nbytes // size)
        got, chunk, block = oneshot.launch_plan(numel, size)
        if size == 2:
            assert got == programs
        assert got <= oneshot.MAX_PROGRAMS
        assert chunk % 16 == 0 and got * chunk >= numel > (got - 1) * chunk
        # Every thread's step is a 16-byte vector.
        assert block >= 16 // size * 32 * oneshot.NUM_WARPS and block & (block - 1) == 0


def test_buffer_sizes_round_trip() -> None:
    for world in (2, 4, 8):
        for message in (1, 16, 8192, 1000):
            nbytes = oneshot.buffer_bytes_for(message, world)
            assert oneshot.slot_bytes(nbytes, world) >= message
            assert oneshot.slot_bytes(nbytes, world) % 16 == 0


def test_clear_fills_every_half_word_with_the_empty_pattern() -> None:
    buf = oneshot.clear(torch.zeros(64, dtype=torch.uint8))
    assert bool((buf.view(torch.int16) == -32768).all())
    assert bool((buf.view(torch.int32) == -2147450880).all())


def _args(n: int = 64, dtype: torch.dtype = F16, world: int = 2):
    x = torch.zeros(n, dtype=dtype)
    return dict(x=x, out=torch.empty_like(x),
                buffer=torch.zeros(oneshot.buffer_bytes_for(n * 4, world), dtype=torch.uint8),
                buffer_ptrs=torch.zeros(world, dtype=torch.int64), rank=0, world=world,
                state=oneshot.new_state("cpu"))


@pytest.mark.parametrize("change,match", [
    (dict(x=torch.zeros(64, dtype=torch.int32)), "dtype torch.int32 is not one of"),
    (dict(out=torch.empty(65, dtype=F16)), "out is torch.float16 \\(65,\\)"),
    (dict(residual=torch.zeros(64, dtype=F32)), "residual is torch.float32"),
    (dict(x=torch.zeros(64, 2, dtype=F16).t()[0]), "x must be contiguous"),
    (dict(buffer=torch.zeros(500, dtype=torch.uint8)),
     "128 bytes of x exceed the 112-byte slot of the 500-byte"),
    (dict(buffer=torch.zeros(64, dtype=F32)), "must be a 1-D uint8"),
    (dict(buffer_ptrs=torch.zeros(3, dtype=torch.int64)), "buffer_ptrs must be int64"),
    (dict(world=1), "world size 1 is not in 2..8"),
    (dict(world=9), "world size 9 is not in 2..8"),
    (dict(rank=2), "rank 2 is not in 0..1"),
    (dict(out=torch.empty(64, dtype=F16, device="meta")), "out is on meta"),
    (dict(state=torch.zeros(2, dtype=torch.int64)), "state must be int32 of shape \\(2,\\)"),
    (dict(state=torch.zeros(3, dtype=torch.int32)), "state must be int32"),
    (dict(state=torch.zeros(2, dtype=torch.int32, device="meta")), "state is on meta"),
])
def test_the_launcher_refuses_bad_arguments(change: dict, match: str) -> None:
    args = _args()
    if change.get("x") is not None and "out" not in change:
        x = change["x"]
        args["out"] = torch.empty(x.shape, dtype=x.dtype)
    args.update(change)
    residual = args.pop("residual", None)
    with pytest.raises(ValueError, match=match):
        oneshot.all_reduce(args.pop("x"), args.pop("out"), args.pop("buffer"),
                           args.pop("buffer_ptrs"), args.pop("rank"), args.pop("world"),
                           args.pop("state"), residual)



@needs_interpreter
def test_every_variant_compiles_for_hopper() -> None:
    """The interpreter ran the first version of this kernel happily; the compiler refused
    it (a global that was not constexpr, a return inside a constexpr `if`)."""
    variants = []
    for dtype, wide in (("fp16", False), ("bf16", False), ("fp32", True)):
        sig = {"x_ptr": f"*{dtype}", "res_ptr": f"*{dtype}", "out_ptr": f"*{dtype}",
               "buf_ptrs": "*i64", "state_ptr": "*i32", "n": "i32", "chunk": "i32",
               "slot": "i32", "rank": "i32", "programs": "i32"}
        variants += [(sig, {"WORLD": world, "BLOCK": 1024, "HAS_RES": res, "WIDE": wide,
                            "USE_PDL": pdl}, {})
                     for world in (2, 4) for res in (False, True) for pdl in (False, True)]
    err, _ = compile_for_hopper("hybridgraph.kernels.oneshot", "_oneshot_kernel", variants)
    assert err == "", err
