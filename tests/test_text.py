"""Stop strings across token boundaries and incremental detokenization."""

from __future__ import annotations

import pytest

from hybridgraph.model.tokenizer import ByteTokenizer
from hybridgraph.request import RequestError
from hybridgraph.text import MAX_STOP_STRINGS, StopMatcher, TextStream, validate_stop


def feed(matcher: StopMatcher, pieces: list[str]) -> tuple[str, bool]:
    out = ""
    for p in pieces:
        text, hit = matcher.push(p)
        out += text
        if hit:
            return out, True
    return out + matcher.flush(), False


def test_a_stop_string_split_over_pieces_is_found_and_left_out() -> None:
    assert feed(StopMatcher(["</answer>"]), ["The end</", "ans", "wer> more"]) == ("The end", True)


def test_text_that_only_looks_like_a_stop_start_is_released() -> None:
    m = StopMatcher(["STOP"])
    assert m.push("ab ST") == ("ab ", False)   # "ST" may begin STOP: held back
    assert m.push("ay") == ("STay", False)     # it did not
    assert feed(StopMatcher(["STOP"]), ["x S", "T"]) == ("x ST", False)  # released at the end


def test_the_earliest_of_several_stop_strings_wins() -> None:
    assert feed(StopMatcher(["world", "lo w"]), ["hello world"]) == ("hel", True)


def test_no_stop_strings_passes_everything() -> None:
    assert StopMatcher([]).push("anything") == ("anything", False)


def test_text_stream_over_bytes_cuts_at_the_stop_string() -> None:
    tok = ByteTokenizer(bos_id=None)
    stream = TextStream(tok, ["☕"])
    out = [stream.step(i) for i in tok.encode("café ☕ more")]
    assert stream.text == "café " and out[-1] == ("", True)


def test_text_stream_final_step_releases_held_text() -> None:
    tok = ByteTokenizer(bos_id=None)
    stream = TextStream(tok, ["xyz"])
    ids = tok.encode("ax")
    assert stream.step(ids[0]) == ("a", False)
    assert stream.step(ids[1], final=True) == ("x", False)
    assert stream.text == "ax"


@pytest.mark.parametrize("stop, match", [
    ("stop", "must be a list of strings"),
    (["ok", 3], r"stop\[1\] must be a string"),
    ([""], r"stop\[0\] must be a string of 1 to"),
    (["x" * 1000], r"stop\[0\] must be a string of 1 to 256"),
    (["s"] * (MAX_STOP_STRINGS + 1), f"{MAX_STOP_STRINGS + 1} stop strings; at most "
                                     f"{MAX_STOP_STRINGS}"),
])
def test_bad_stop_lists_are_named(stop, match: str) -> None:
    with pytest.raises(RequestError, match=match) as info:
        validate_stop(stop)
    assert info.value.field == "stop"


def test_good_stop_lists_pass() -> None:
    assert validate_stop(None) == ()
    assert validate_stop(["a", "b"]) == ("a", "b")
