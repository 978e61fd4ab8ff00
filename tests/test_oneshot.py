"""The one-shot all-reduce kernel (kernels/oneshot.py) in Triton's interpreter, on the CPU.

Each rank's launch runs for real (copy-in, the barrier's atomics, the sum, the residual,
the stores, the phase flip) against host buffers standing in for its peers' symmetric memory; a thread
plays the peers' side of the barrier (tests/triton_interpreter.HostRanks). What this
checks: the arithmetic (float32 sum in rank order, rounded, residual added as PyTorch
rounds it: bit-equal to `reference` and so to the same sum on every rank), the chunking
(every element once, odd sizes), the barrier protocol from one rank's side (it completes,
and the pads end every call at zero so calls can repeat), the halves alternating call by
call, and the launcher's refusals.
Not checked here: ranks running at once on GPUs, memory ordering across NVLink, CUDA
graph replay, bfloat16 (the interpreter computes it wrongly): tests/gpu/test_oneshot.py.
"""

from __future__ import annotations

import time

import pytest
import torch

from tests.triton_interpreter import HostRanks, needs_interpreter

oneshot = pytest.importorskip("hybridgraph.kernels.oneshot")

F16, F32 = torch.float16, torch.float32


def _parts(world: int, shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen).to(dtype) for _ in range(world)]


def _run(ranks: HostRanks, rank: int, parts, residual=None, calls: int = 1):
    x = parts[rank]
    programs = oneshot.launch_plan(x.numel(), x.element_size(), ranks.world,
                                   ranks.pad_bytes)[0]
    out = torch.empty_like(x)
    ranks.fill(parts)

    def launch():
        for _ in range(calls):
            oneshot.all_reduce(x, out, ranks.buffers[rank], ranks.buffer_ptrs,
                               ranks.signal_pads, rank, ranks.world, ranks.states[rank],
                               residual, pad_bytes=ranks.pad_bytes)
        return out
    return ranks.run(rank, programs, launch, calls=calls)


@needs_interpreter
@pytest.mark.parametrize("dtype", [F16, F32])
@pytest.mark.parametrize("world,shape", [(2, (1, 4096)), (2, (3, 1001)), (4, (2, 2048))])
@pytest.mark.parametrize("with_residual", [False, True])
def test_every_rank_gets_the_reference_bit_for_bit(dtype, world, shape, with_residual) -> None:
    parts = _parts(world, shape, dtype)
    residual = _parts(1, shape, dtype, seed=9)[0] if with_residual else None
    want = oneshot.reference(parts, residual)
    ranks = HostRanks(world, 2 * 4 * 4096 * 4)
    for rank in range(world):
        got = _run(ranks, rank, parts, residual)
        assert torch.equal(got, want), (rank, (got.float() - want.float()).abs().max())
        assert ranks.pads_clear()   # self-resetting: nothing left for the next call
    # Against float64: the one rounding of the float32 sum, one of the dtype.
    exact = sum(p.double() for p in parts) + (residual.double() if with_residual else 0)
    tol = {F16: 4e-3, F32: 1e-5}[dtype] * exact.abs().max().item()
    assert (want.double() - exact).abs().max().item() <= tol


@needs_interpreter
def test_repeated_calls_reuse_the_pads_and_alternate_halves() -> None:
    """Three calls in a row (a graph replayed): each one's barrier finds the pads as the
    last left them, the result stays right, and the calls use the halves in turn (each
    copy-in lands in its call's half: the other half keeps what it held)."""
    parts = _parts(2, (2, 1024), F16, seed=3)
    ranks = HostRanks(2, 2 * 2 * 1024 * 2)
    half = oneshot.half_bytes(ranks.buffers[1].numel())
    own = parts[1].reshape(-1)
    for calls, phase in ((1, 1), (2, 0), (3, 1)):
        ranks.states[1].zero_()
        got = _run(ranks, 1, parts, calls=calls)
        assert torch.equal(got, oneshot.reference(parts)) and ranks.pads_clear()
        assert ranks.states[1].tolist() == [phase, 0]   # phase flipped once a call
    # One call from phase 0 copies in to half 0 only: poison both halves of this rank's
    # buffer first; half 0 must come back as this rank's part, half 1 untouched.
    ranks.fill(parts)
    for at in (0, half):
        ranks.buffers[1][at:at + 4096].view(F16).fill_(7.0)
    ranks.states[1].zero_()
    out = torch.empty_like(parts[1])
    got = ranks.run(1, oneshot.launch_plan(own.numel(), 2, 2, ranks.pad_bytes)[0],
                    lambda: oneshot.all_reduce(parts[1], out, ranks.buffers[1],
                                               ranks.buffer_ptrs, ranks.signal_pads, 1, 2,
                                               ranks.states[1], pad_bytes=ranks.pad_bytes))
    assert torch.equal(got, oneshot.reference(parts))
    assert torch.equal(ranks.buffers[1][:4096].view(F16), own)
    assert bool((ranks.buffers[1][half:half + 4096].view(F16) == 7.0).all())
    # From phase 1 the peer's part is read from its half 1: poison its half 0.
    ranks.fill(parts)
    ranks.buffers[0][:4096].view(F16).fill_(7.0)
    ranks.states[1].copy_(torch.tensor([1, 0]))
    got = ranks.run(1, oneshot.launch_plan(own.numel(), 2, 2, ranks.pad_bytes)[0],
                    lambda: oneshot.all_reduce(parts[1], out, ranks.buffers[1],
                                               ranks.buffer_ptrs, ranks.signal_pads, 1, 2,
                                               ranks.states[1], pad_bytes=ranks.pad_bytes))
    assert torch.equal(got, oneshot.reference(parts)) and ranks.states[1].tolist() == [0, 0]


class _FastPeer(HostRanks):
    """Three ranks, one program; rank 0 runs the kernel twice (one barrier a call). Peer 1
    is fast and peer 2 slow: the rank's barrier lanes must leave a peer alone once its lane
    is through."""

    def _play_peers(self, rank: int, programs: int, calls: int, deadline: float) -> None:
        pad, p, q = self.pads, 1, 2
        self.seen: list[int] = []

        def until(t: torch.Tensor, slot: int, value: int) -> None:
            while int(t[slot]) != value:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"slot {slot} never became {value}")
                time.sleep(0.0002)

        # Call 1's barrier. Rank 0's put to q finds q's slot still raised (q has not
        # consumed a previous signal), so its put lane to q keeps retrying while p's lane
        # is through.
        until(pad[0], p, 0)
        pad[0][p] = 1                     # p signals rank 0
        until(pad[p], 0, 1)
        pad[p][0] = 0                     # and consumes rank 0's signal: p is through
        time.sleep(0.2)                   # rank 0 retries its put to q meanwhile
        self.seen.append(int(pad[p][0]))  # a second put to p would show here as 1
        pad[q][0] = 0                     # q consumes the old signal: rank 0's put lands
        until(pad[0], p, 0)               # rank 0 took p's signal; p signals its NEXT
        pad[0][p] = 1                     # call's barrier before q has signalled this one
        time.sleep(0.2)                   # rank 0 waits on q with p's lane through
        until(pad[0], q, 0)
        pad[0][q] = 1
        until(pad[q], 0, 1)
        pad[q][0] = 0
        # Call 2's barrier: p's signal is already there (unless rank 0 took it too early).
        until(pad[p], 0, 1)
        pad[p][0] = 0
        until(pad[q], 0, 1)
        pad[q][0] = 0
        until(pad[0], q, 0)
        pad[0][q] = 1


@needs_interpreter
def test_barrier_lanes_leave_a_peer_alone_once_through() -> None:
    """A lane that is through swaps 0 for 0: it neither signals its peer twice nor takes
    the signal that peer already sent for the next call's barrier (that would deadlock)."""
    parts = _parts(3, (1, 256), F32, seed=6)
    ranks = _FastPeer(3, 2 * 256 * 4)
    ranks.pads[2][0] = 1                  # q's slot for rank 0 still raised
    ranks.fill(parts)
    out = torch.empty_like(parts[0])

    def launch():
        for _ in range(2):
            oneshot.all_reduce(parts[0], out, ranks.buffers[0], ranks.buffer_ptrs,
                               ranks.signal_pads, 0, 3, ranks.states[0],
                               pad_bytes=ranks.pad_bytes)
        return out
    got = ranks.run(0, 1, launch, timeout_s=30.0)
    assert ranks.seen == [0]
    assert torch.equal(got, oneshot.reference(parts)) and ranks.pads_clear()


@needs_interpreter
def test_arithmetic_without_barriers() -> None:
    """barrier=False: the sum and residual alone, peers' buffers pre-filled."""
    parts = _parts(8, (5, 96), F32, seed=4)
    residual = _parts(1, (5, 96), F32, seed=5)[0]
    ranks = HostRanks(8, 2 * 5 * 96 * 4)
    ranks.fill(parts)
    out = torch.empty_like(parts[0])
    oneshot.all_reduce(parts[3], out, ranks.buffers[3], ranks.buffer_ptrs, ranks.signal_pads,
                       3, 8, ranks.states[3], residual, pad_bytes=ranks.pad_bytes,
                       barrier=False)
    assert torch.equal(out, oneshot.reference(parts, residual))


def test_reference_sums_in_float32_in_rank_order() -> None:
    a, b = torch.tensor([2048.0], dtype=F16), torch.tensor([1.0], dtype=F16)
    c = torch.tensor([1.0], dtype=F16)
    # fp16 pairwise: (2048 + 1) rounds to 2048, + 1 again 2048; float32 keeps 2050.
    assert oneshot.reference([a, b, c]).item() == 2050.0
    # With a residual the sum is rounded first (2049 -> 2048), then 2048 + 1 -> 2048 again.
    assert oneshot.reference([a, b], residual=c).item() == 2048.0


@pytest.mark.parametrize("nbytes,world,programs", [
    (8192, 2, 4), (16384, 2, 8), (64 * 4096 * 2, 2, 32), (64 * 8192 * 4, 8, 32), (2, 2, 1),
    (4096 * 2, 8, 4)])
def test_launch_plan(nbytes: int, world: int, programs: int) -> None:
    for size in (2, 4):
        numel = max(1, nbytes // size)
        got, chunk, block = oneshot.launch_plan(numel, size, world)
        if size == 2:
            assert got == programs
        assert got <= oneshot.MAX_PROGRAMS and got * world * 4 <= oneshot.DEFAULT_PAD_BYTES
        assert chunk % 16 == 0 and got * chunk >= numel > (got - 1) * chunk
        # Every thread's step is a 16-byte vector.
        assert block >= 16 // size * 32 * oneshot.NUM_WARPS and block & (block - 1) == 0
    # A smaller signal pad bounds the programs: 64 slots at 8 ranks.
    assert oneshot.launch_plan(1 << 20, 2, 8, pad_bytes=256)[0] == 8


def _args(n: int = 64, dtype: torch.dtype = F16, world: int = 2):
    x = torch.zeros(n, dtype=dtype)
    return dict(x=x, out=torch.empty_like(x), buffer=torch.zeros(n * 4, dtype=torch.uint8),
                buffer_ptrs=torch.zeros(world, dtype=torch.int64),
                signal_pads=torch.zeros(world, dtype=torch.int64), rank=0, world=world,
                state=oneshot.new_state("cpu"))


@pytest.mark.parametrize("change,match", [
    (dict(x=torch.zeros(64, dtype=torch.int32)), "dtype torch.int32 is not one of"),
    (dict(out=torch.empty(65, dtype=F16)), "out is torch.float16 \\(65,\\)"),
    (dict(residual=torch.zeros(64, dtype=F32)), "residual is torch.float32"),
    (dict(x=torch.zeros(64, 2, dtype=F16).t()[0]), "x must be contiguous"),
    (dict(buffer=torch.zeros(255, dtype=torch.uint8)),
     "128 bytes of x exceed the 112-byte half of the 255-byte"),
    (dict(buffer=torch.zeros(64, dtype=F32)), "must be a 1-D uint8"),
    (dict(buffer_ptrs=torch.zeros(3, dtype=torch.int64)), "buffer_ptrs must be int64"),
    (dict(signal_pads=torch.zeros(2, dtype=torch.int32)), "signal_pads must be int64"),
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
                           args.pop("buffer_ptrs"), args.pop("signal_pads"), args.pop("rank"),
                           args.pop("world"), args.pop("state"), residual)
