"""SamplingParams owns the sampling bounds; the engine refuses what is not one (no torch
needed for most of this: request.py is imported by clients too)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hybridgraph.request import RequestError, SamplingParams, check_stop_ids


@pytest.mark.parametrize("kwargs, field, words", [
    (dict(temperature=math.inf), "temperature", "finite"),
    (dict(temperature=math.nan), "temperature", "finite"),
    (dict(temperature=-0.5), "temperature", ">= 0"),
    (dict(temperature=True), "temperature", "bool"),
    (dict(temperature="1.0"), "temperature", "str"),
    (dict(top_p=False), "top_p", "bool"),
    (dict(top_p=0.0), "top_p", "(0, 1]"),
    (dict(top_p=1.5), "top_p", "(0, 1]"),
    (dict(top_p=math.nan), "top_p", "finite"),
    (dict(top_k=True), "top_k", "bool"),
    (dict(top_k=2.0), "top_k", "float"),
    (dict(top_k=-2), "top_k", "-1 is off"),
    (dict(top_k=2**40), "top_k", "2147483647"),
    (dict(seed=-1), "seed", "2^63"),
    (dict(seed=2**63), "seed", "2^63"),
    (dict(seed=1.5), "seed", "float"),
    (dict(seed=np.float64(3)), "seed", "float64"),
])
def test_bad_values_are_refused_naming_the_field(kwargs: dict, field: str, words: str) -> None:
    with pytest.raises(RequestError) as e:
        SamplingParams(**kwargs).validate()
    assert e.value.field == field
    assert str(e.value).startswith(f"{field}: ") and words in str(e.value), str(e.value)


def test_numpy_scalars_are_numbers_and_top_k_minus_one_is_off() -> None:
    s = SamplingParams(temperature=np.float32(0.5), top_k=np.int64(7), top_p=np.float64(0.9),
                       seed=np.uint32(3)).validate()
    assert (s.temperature, s.top_k, s.top_p, s.seed) == (0.5, 7, pytest.approx(0.9), 3)
    assert all(type(v) in (int, float) for v in (s.temperature, s.top_k, s.top_p, s.seed))
    assert SamplingParams(top_k=-1).validate().top_k == 0 == SamplingParams().top_k
    assert type(SamplingParams(temperature=1).validate().temperature) is float
    with pytest.raises(RequestError, match=r"top_k: must be an integer in \[0, .*got -5$"):
        SamplingParams(top_k=np.int64(-5)).validate()  # the range message, not a type one
    assert SamplingParams(top_k=-1).to_wire()["top_k"] == 0
    with pytest.raises(RequestError):
        SamplingParams(temperature=math.inf).to_wire()


def test_of_refuses_what_is_not_sampling_params() -> None:
    assert SamplingParams.of(None) == SamplingParams()
    s = SamplingParams(temperature=1.0)
    assert SamplingParams.of(s) == s
    assert SamplingParams.of(SamplingParams(top_k=np.int64(3))).top_k == 3
    with pytest.raises(RequestError) as e:
        SamplingParams.of(SamplingParams(temperature=math.inf))
    assert e.value.field == "temperature"
    for bad in ({}, {"temperature": 1.0}, 0.7):
        with pytest.raises(RequestError) as e:
            SamplingParams.of(bad)
        assert e.value.field == "sampling"


def test_stop_ids_must_be_a_list_of_token_ids() -> None:
    assert check_stop_ids(None) is None
    assert check_stop_ids((2, np.int64(5))) == [2, 5]
    for bad, words in [("2", "list"), (2, "list"), ({2}, "list"), ([2, "3"], "[1]"),
                       ([True], "[0]"), ([1.0], "[0]"), ([-1], "[0]")]:
        with pytest.raises(RequestError) as e:
            check_stop_ids(bad)
        assert e.value.field == "stop_ids" and words in str(e.value), str(e.value)


def test_engine_refuses_a_dict_and_bad_stop_ids() -> None:
    from hybridgraph.engine import Engine

    engine = Engine.load("tiny", device="cpu")
    with pytest.raises(RequestError) as e:
        engine.generate([1, 5], 2, sampling={})  # type: ignore[arg-type]
    assert e.value.field == "sampling"
    with pytest.raises(RequestError) as e:
        engine.generate([1, 5], 2, stop_ids="2")  # type: ignore[arg-type]
    assert e.value.field == "stop_ids"
    assert engine.generate([1, 5], 2, SamplingParams(top_k=-1), stop_ids=[]).tokens == \
        engine.generate([1, 5], 2, SamplingParams(), stop_ids=[]).tokens
