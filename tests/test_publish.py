"""kernels/publish.py on the CPU through Triton's interpreter, and the step's token ring
around it (runtime/step.py StepBuffers.publish, TokenReader): each token lands in the slot
of its position, masked rows keep their slot, and the reader finds each row's token by its
position. Compiled, from inside a CUDA graph into page-locked memory: tests/gpu/test_publish.py.
"""

from __future__ import annotations

import pytest
import torch

from tests.triton_interpreter import needs_interpreter


@needs_interpreter
@pytest.mark.parametrize("first", [0, 3])
def test_publish_writes_each_token_at_its_positions_slot(first: int) -> None:
    from hybridgraph.kernels.publish import publish
    ring = torch.full((8, 8), -1, dtype=torch.int64)
    ids, pos = torch.tensor([11, 12, 13, 14]), torch.tensor([5, 8, 13, 100])
    publish(ids[:3], pos[:3], ring, first)
    expect = torch.full((8, 8), -1, dtype=torch.int64)
    for j in range(3):
        expect[int(pos[j]) % 8, first + j] = int(ids[j])
    assert torch.equal(ring, expect)
    publish(ids + 10, pos + 1, ring, first, active=torch.tensor([1, 0, 1, 1]))
    for j in (0, 2, 3):  # row 1 is masked: its slot and every other stay as they were
        expect[int(pos[j] + 1) % 8, first + j] = int(ids[j] + 10)
    assert torch.equal(ring, expect)
    with pytest.raises(ValueError, match="outside the ring"):
        publish(ids, pos, ring, 5)


def test_step_buffers_publish_and_the_reader_find_tokens_by_position() -> None:
    """On the CPU the ring is host memory written by torch (no kernel): what the reader
    returns for (row, position) is what the step published there, masked rows untouched."""
    from hybridgraph.runtime.step import TOKEN_SLOTS, StepBuffers, TokenReader
    bufs = StepBuffers(4, 64, torch.device("cpu"))
    reader = TokenReader(bufs)
    bufs.publish(torch.tensor([7, 8]), torch.tensor([10, 3]), first=2)
    reader.push(0)
    assert reader.read(0, [2, 3], [10, 3]) == [7, 8]
    bufs.publish(torch.tensor([1, 2, 3, 4]), torch.tensor([11, 11, 11, 3]), first=0,
                 active=torch.tensor([1, 1, 1, 0]))
    reader.push(1)
    assert reader.read(1, [0, 1, 2, 3], [11, 11, 11, 3]) == [1, 2, 3, 8]
    assert reader.read(0, [2], [10 + TOKEN_SLOTS]) == [7]  # slots repeat every TOKEN_SLOTS


def test_a_finish_on_any_row_compiles_nothing_new() -> None:
    """A prefill's finish passes row slices of the step buffers, starting at its first row:
    an int64 slice at an odd row is 8-byte aligned, which Triton would specialize (one more
    compile, mid-serving, for the first request landing there). The kernels a finish
    launches take those pointers unspecialized; checked against Triton's own specializer."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    from hybridgraph.kernels.argmax import _argmax_kernel
    from hybridgraph.kernels.publish import _publish_kernel
    from hybridgraph.kernels.sampling import _chunk_mass_kernel, _draw_kernel
    rows = torch.zeros(8, dtype=torch.int64)
    keys = {native_specialize_impl(BaseBackend, rows[r:], False, True, True)[1]
            for r in (0, 1)}
    assert len(keys) == 2  # the premise: specialized, rows 0 and 1 are two kernels
    sliced = {_argmax_kernel: ["out_ptr", "first"],
              _publish_kernel: ["ids_ptr", "pos_ptr", "act_ptr", "first"],
              _chunk_mass_kernel: ["temp_ptr", "topk_ptr"],
              _draw_kernel: ["temp_ptr", "topk_ptr", "topp_ptr", "seed_ptr", "cnt_ptr",
                             "out_ptr"]}
    for kernel, names in sliced.items():
        # A JITFunction keeps the list; the interpreter's InterpretedFunction its kwargs.
        off = getattr(kernel, "do_not_specialize", None)
        off = set(off if off is not None else kernel.kwargs.get("do_not_specialize") or ())
        for name in names:
            keys = {native_specialize_impl(BaseBackend, rows[r:], False, name not in off,
                                           True)[1] for r in (0, 1)}
            assert len(keys) == 1, (kernel, name)
