"""StepBuffers' host mirrors: sampling parameters are copied in only when they change."""

from __future__ import annotations

import torch

from hybridgraph.runtime.step import GREEDY, StepBuffers


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
