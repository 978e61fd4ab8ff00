"""The graph cache's plain-Python half: LRU policy, limits, bucket lookup, stats, coverage."""

from __future__ import annotations

import pytest

from hybridgraph.runtime.dynamic import choose_bucket
from hybridgraph.runtime.graphs import GraphKey, GraphPolicy, parse_coverage


def prefill(length: int, batch: int = 1) -> GraphKey:
    return GraphKey("prefill", batch, length, "none")


def decode(window: int, batch: int = 1, sampler: str = "greedy") -> GraphKey:
    return GraphKey("decode", batch, window, sampler)


def filled(keys: list[GraphKey], nbytes: int = 100, **limits: int) -> GraphPolicy:
    policy = GraphPolicy(**limits)
    for k in keys:
        policy.add(k, nbytes)
    return policy


# -------------------------------------------------------------------------- LRU order

def test_lru_order_follows_use() -> None:
    a, b, c = prefill(8), prefill(16), prefill(32)
    policy = filled([a, b, c], max_graphs=3)
    assert policy.victims() == [a]       # oldest first
    assert policy.lookup(a) == a          # a use makes a the most recent
    assert policy.victims() == [b]
    assert list(policy.entries) == [b, c, a]


def test_serving_a_larger_bucket_counts_as_a_use() -> None:
    small, big = prefill(8), prefill(64)
    policy = filled([big, small], max_graphs=2)
    assert policy.lookup(prefill(20)) == big
    assert policy.victims() == [small]


# ----------------------------------------------------------------------------- limits

def test_max_graphs() -> None:
    keys = [prefill(n) for n in (1, 2, 4, 8, 16)]
    policy = filled(keys[:4], max_graphs=4)
    assert policy.victims() == [keys[0]]
    policy = filled(keys[:3], max_graphs=4)
    assert policy.victims() == []          # room for one more
    policy = filled(keys, max_graphs=2)    # over the limit already: back under it, plus one
    assert policy.victims() == keys[:4]


def test_max_bytes() -> None:
    policy = GraphPolicy(max_bytes=1000)
    sizes = {prefill(1): 300, prefill(2): 200, prefill(4): 400}
    for k, n in sizes.items():
        policy.add(k, n)
    assert policy.stats.bytes_held == 900
    assert policy.victims(100) == []                       # exactly at the budget is fine
    assert policy.victims(101) == [prefill(1)]
    assert policy.victims(600) == [prefill(1), prefill(2)]  # 900 - 500 + 600 = 1000
    assert policy.victims(601) == list(sizes)
    assert policy.fits(1000) and not policy.fits(1001)
    assert GraphPolicy().fits(10**15)


def test_both_limits_bind() -> None:
    policy = filled([prefill(1), prefill(2), prefill(4)], nbytes=100, max_graphs=3,
                    max_bytes=250)
    # The count alone needs one victim; the bytes need two.
    assert policy.victims(100) == [prefill(1), prefill(2)]


def test_victims_does_not_evict() -> None:
    policy = filled([prefill(1), prefill(2)], max_graphs=1)
    policy.victims()
    assert len(policy.entries) == 2 and policy.stats.evictions == 0


def test_add_remove_and_stats() -> None:
    policy = GraphPolicy(max_graphs=8)
    policy.add(prefill(8), 1000)
    policy.add(decode(256), 500)
    assert policy.stats.bytes_held == 1500
    policy.remove(prefill(8))
    assert policy.stats.bytes_held == 500 and policy.stats.evictions == 1
    assert list(policy.entries) == [decode(256)]
    with pytest.raises(KeyError):
        policy.remove(prefill(8))
    assert policy.stats.as_dict()["bytes_held"] == 500


def test_re_adding_a_key_replaces_it() -> None:
    policy = filled([prefill(1), prefill(2)], nbytes=100)
    policy.add(prefill(1), 300)
    assert policy.stats.bytes_held == 400
    assert list(policy.entries) == [prefill(2), prefill(1)]


# ----------------------------------------------------------------------------- lookup

def test_exact_key_hit() -> None:
    policy = filled([prefill(8), prefill(16)])
    assert policy.lookup(prefill(8)) == prefill(8)
    assert (policy.stats.hits, policy.stats.misses) == (1, 0)


def test_nearest_larger_length_of_the_same_kind() -> None:
    held = [prefill(64), prefill(16), prefill(32), prefill(8, batch=2),
            decode(512, sampler="greedy"), decode(2048, sampler="sample"), decode(1024)]
    policy = filled(held)
    assert policy.lookup(prefill(9)) == prefill(16)     # nearest, not first or largest
    assert policy.lookup(prefill(33)) == prefill(64)
    assert policy.lookup(prefill(65)) is None            # nothing larger
    assert policy.lookup(prefill(4, batch=4)) is None    # other batch buckets never serve
    assert policy.lookup(prefill(4, batch=2)) == prefill(8, batch=2)
    assert policy.lookup(decode(300)) == decode(512)
    assert policy.lookup(decode(600)) == decode(1024)
    assert policy.lookup(decode(600, sampler="sample")) == decode(2048, sampler="sample")
    assert policy.lookup(decode(100, sampler="none")) is None  # other samplers never serve
    assert policy.lookup(decode(8, sampler="none")._replace(phase="prefill")) == prefill(16)
    # Every lookup above was a miss of its exact key.
    assert (policy.stats.hits, policy.stats.misses) == (0, 10)


def test_hits_and_misses_count() -> None:
    policy = filled([prefill(8)])
    for _ in range(3):
        policy.lookup(prefill(8))
    policy.lookup(prefill(4))
    policy.lookup(prefill(9))
    assert (policy.stats.hits, policy.stats.misses) == (3, 2)


# --------------------------------------------------------------------------- coverage

def test_coverage_exact() -> None:
    assert parse_coverage("exact", 6) == [1, 2, 3, 4, 5, 6]


def test_coverage_every() -> None:
    assert parse_coverage("every:10", 35) == [10, 20, 30, 35]
    assert parse_coverage("every:10", 30) == [10, 20, 30]
    assert parse_coverage("every:1", 3) == [1, 2, 3]
    assert parse_coverage("every:100", 30) == [30]


def test_coverage_pow2() -> None:
    assert parse_coverage("pow2", 100) == [1, 2, 4, 8, 16, 32, 64, 100]
    assert parse_coverage("pow2", 64) == [1, 2, 4, 8, 16, 32, 64]
    assert parse_coverage(" pow2 ", 1) == [1]


def test_coverage_pow2_fine_adds_midpoints_where_prefill_is_compute_bound() -> None:
    assert parse_coverage("pow2-fine", 100) == parse_coverage("pow2", 100)
    assert parse_coverage("pow2-fine", 512) == [1, 2, 4, 8, 16, 32, 64, 128, 256, 384, 512]
    assert parse_coverage("pow2-fine", 2048)[-5:] == [512, 768, 1024, 1536, 2048]
    assert parse_coverage("pow2-fine", 400)[-3:] == [256, 384, 400]


@pytest.mark.parametrize("spec", ["3,5,9", "list:3,5,9", " 9, 3 ,5,5 ", "5,3,9,"])
def test_coverage_list(spec: str) -> None:
    assert parse_coverage(spec, 12) == [3, 5, 9, 12]


def test_coverage_list_drops_lengths_past_the_maximum() -> None:
    assert parse_coverage("4,100,7", 10) == [4, 7, 10]


@pytest.mark.parametrize("spec", ["every:0", "every:-2", "every:x", "fast", "", "0,4",
                                  "-1", "list:", "a,b"])
def test_bad_coverage_raises(spec: str) -> None:
    with pytest.raises(ValueError):
        parse_coverage(spec, 64)


def test_bad_every_names_the_spec() -> None:
    with pytest.raises(ValueError, match="every:x"):
        parse_coverage("every:x", 64)


@pytest.mark.parametrize("spec", ["exact", "every:10", "every:7", "pow2", "pow2-fine",
                                  "5,50,300"])
def test_lookup_serves_every_length_from_its_bucket(spec: str) -> None:
    max_len = 300
    lengths = parse_coverage(spec, max_len)
    assert lengths == sorted(set(lengths)) and lengths[-1] == max_len  # max always covered
    policy = filled([prefill(n) for n in lengths])
    for n in range(1, max_len + 1):
        bucket = choose_bucket(n, lengths)
        assert bucket >= n and not any(n <= x < bucket for x in lengths)
        assert policy.lookup(prefill(n)) == prefill(bucket)
