"""bench/clocks.py: nvidia-smi's lines read, throttle reasons named, samples summarized
per time window; without a GPU the log records nothing and says why."""

from __future__ import annotations

import torch

from hybridgraph.bench.clocks import ClockLog, parse, reasons_text


def test_parse_reads_mhz_and_the_reasons_mask() -> None:
    assert parse("1470, 0x0000000000000004\n") == (1470.0, 4)
    assert parse("1980, 0x0000000000000000") == (1980.0, 0)
    assert parse("[N/A], [N/A]") is None and parse("garbage") is None


def test_reasons_name_each_cap_with_its_share_of_samples() -> None:
    assert reasons_text([0x4, 0x4, 0x4, 0x0]) == "sw power cap 75%"
    assert reasons_text([0x4 | 0x20, 0x4]) == "sw power cap 100% + sw thermal 50%"
    assert reasons_text([0x0, 0x1]) == reasons_text([]) == "none"  # idle is no cap


def test_between_takes_the_window_median_and_every_cap_seen() -> None:
    log = ClockLog(torch.device("cpu"))
    assert log.between(0.0, 1e9) == ("n/a (no GPU)", "n/a (no GPU)")
    log.samples = [(1.0, 1980.0, 0x1), (2.0, 1500.0, 0x4), (3.0, 1470.0, 0x4),
                   (4.0, 1485.0, 0x0), (9.0, 1980.0, 0x20)]
    assert log.between(1.5, 4.5) == (1485.0, "sw power cap 67%")
    assert log.between(0.5, 1.5) == (1980.0, "none")
    assert log.between(0.0, 10.0)[1] == "sw power cap 40% + sw thermal 20%"
    log.close()
