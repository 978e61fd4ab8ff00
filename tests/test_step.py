"""StepBuffers' host mirrors: sampling parameters are copied in only when they change;
prompts go through the host staging.
The compiled blocks: how often they compile."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from hybridgraph.model.config import preset
from hybridgraph.model.llama import Transformer
from hybridgraph.runtime.step import GREEDY, StepBuffers, compiled_blocks
from tests.triton_interpreter import needs_interpreter


def test_set_sampling_writes_the_rows_it_names() -> None:
    bufs = StepBuffers(4, 16, torch.device("cpu"))
    bufs.set_sampling(1, [(0.7, 40, 0.9, 123), GREEDY])
    assert bufs.temperature.tolist() == [0.0, torch.tensor(0.7).item(), 0.0, 0.0]
    assert bufs.top_k.tolist() == [0, 40, 0, 0]
    assert bufs.top_p.tolist() == [1.0, torch.tensor(0.9).item(), 1.0, 1.0]
    assert bufs.seed.tolist() == [0, 123, 0, 0]


def test_set_sampling_skips_rows_that_already_hold_the_params() -> None:
    bufs = StepBuffers(2, 16, torch.device("cpu"))
    bufs.set_sampling(0, [GREEDY, GREEDY])          # what a fresh buffer holds: no copy
    bufs.seed.fill_(99)                             # a copy would overwrite this
    bufs.set_sampling(0, [GREEDY, GREEDY])
    assert bufs.seed.tolist() == [99, 99]
    bufs.set_sampling(0, [GREEDY, (1.0, 0, 1.0, 5)])  # a change: that slice is copied
    assert bufs.seed.tolist() == [0, 5] and bufs.temperature.tolist() == [0.0, 1.0]
    bufs.seed.fill_(7)
    bufs.set_sampling(1, [(1.0, 0, 1.0, 5)])        # row 1 holds these already
    assert bufs.seed.tolist() == [7, 7]


def test_load_prompts_fills_the_rows_and_leaves_nothing_of_an_earlier_prompt() -> None:
    bufs = StepBuffers(3, 8, torch.device("cpu"))
    assert bufs.load_prompts([[5, 6, 7, 8, 9], [4]], 3, 6, 0) == [4, 0, 0]
    assert bufs.prompt_ids[:3, :6].tolist() == [[5, 6, 7, 8, 9, 0], [4, 0, 0, 0, 0, 0],
                                                [0] * 6]
    assert bufs.last_idx.tolist() == [4, 0, 0]
    # A shorter request after it: the staging is refilled, padding included.
    assert bufs.load_prompts([[1, 2, 3]], 1, 4, 2) == [2]
    assert bufs.prompt_ids[0, :4].tolist() == [1, 2, 3, 2]
    assert bufs.last_idx[0].item() == 2
    # Longer than the bucket: the last cols tokens, as fit_to_bucket keeps them.
    assert bufs.load_prompts([list(range(10, 20))], 1, 8, 0) == [7]
    assert bufs.prompt_ids[0].tolist() == list(range(12, 20))


def test_load_prompts_refuses_shapes_past_the_buffers() -> None:
    bufs = StepBuffers(2, 8, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"\[3, 4\] prompts exceed the buffers' \[2, 8\]"):
        bufs.load_prompts([[1]], 3, 4, 0)
    with pytest.raises(ValueError, match="exceed"):
        bufs.load_prompts([[1]], 1, 9, 0)


def test_compiled_blocks_compile_once_per_batch_class() -> None:
    """Start-up order (largest first, as the runner captures): a prefill of the whole cache
    length, a decode window of all of it and a batch of max_batch rows share the one
    dynamic compilation of their block; only one-row steps get their own (torch.compile
    specialises sizes of 1). Each compiled call agrees with the eager block."""
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    max_batch, max_seq = 4, 64
    model = Transformer(preset("tiny")).eval()
    model.setup_caches(max_batch, max_seq)
    bufs = StepBuffers(max_batch, max_seq, torch.device("cpu"))
    bufs.prompt_ids.random_(0, model.config.vocab_size)
    bufs.last_idx.fill_(5)
    bufs.pos.copy_(torch.tensor([3, 9, 17, 40]))
    prefill, decode = compiled_blocks()
    with torch.inference_mode():
        for b, t in [(4, 64), (1, 64), (4, 32), (2, 16), (1, 16)]:
            args = (bufs.prompt_ids[:b, :t], bufs.last_idx[:b])
            got = model.prefill(*args, block=prefill, rows=bufs.rows[:b])
            want = model.prefill(*args, rows=bufs.rows[:b])
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        for b, w in [(4, 64), (4, 32), (2, 64), (1, 64), (1, 32)]:
            args = (bufs.ids[:b], bufs.pos[:b], w)
            torch.testing.assert_close(model.decode(*args, block=decode), model.decode(*args),
                                       rtol=1e-4, atol=1e-4)
    assert counters["stats"]["unique_graphs"] == 4, dict(counters["stats"])


@needs_interpreter
def test_greedy_on_the_kernels_finishes_as_the_three_launches_do() -> None:
    """Steps' one-launch greedy finish (the argmax's Finish: the position advanced, the
    token published; on a GPU inside the step's graph) leaves the step buffers and the
    token ring exactly as the sampler, `pos + active` and the publish do: a decode with a
    masked row, then a prefill of two prompts landing on rows 1 and 2. On the CPU the
    ring is host memory the interpreter's kernels write."""
    from hybridgraph.model.fast_decode import TritonDecode
    from hybridgraph.model.kernel_plan import KernelPlan
    from hybridgraph.model.loader import random_model
    from hybridgraph.runtime.dynamic import greedy
    from hybridgraph.runtime.step import Steps
    from tests.triton_interpreter import F16, SMALL
    model = random_model(SMALL, torch.device("cpu"), F16, seed=1)
    model.setup_caches(4, 64)
    fast = TritonDecode(model, 4, KernelPlan(pdl=False))
    logits = torch.randn(4, SMALL.vocab_size, generator=torch.Generator().manual_seed(3))
    logits[2, 5] = logits[2].max()  # a tie: the first index wins on both paths
    after = []
    for sampler in (fast.greedy, greedy):
        bufs = StepBuffers(4, 64, torch.device("cpu"))
        bufs.kernel_ring = True  # the ring is the kernels' to write
        bufs.pos.copy_(torch.tensor([5, 9, 13, 7]))
        bufs.set_active([1, 0, 1, 1])
        steps = Steps(model, bufs)
        steps.fast = fast
        assert steps._greedy_kernel(sampler) == (sampler == fast.greedy)
        steps.finish_decode(logits, 4, sampler)
        bufs.set_prefill_rows(1)
        bufs.last_idx[:2] = torch.tensor([3, 10])
        steps.finish_prefill(logits[2:], 2, sampler)
        after.append((bufs.ids.clone(), bufs.pos.clone(), bufs.ring.clone()))
    (ids, pos, ring), expect = after
    assert torch.equal(ids, expect[0]) and torch.equal(pos, expect[1])
    assert torch.equal(ring, expect[2])
    assert pos.tolist() == [6, 4, 11, 8]  # row 0 decoded, rows 1-2 prefilled, row 3 decoded
    assert int(fast.ws.counters.abs().sum()) == 0
