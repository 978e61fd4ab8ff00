"""Streamed text deltas join to the full decode, split characters and all."""

from __future__ import annotations

import random

from hybridgraph.model.tokenizer import ByteTokenizer
from hybridgraph.server.textdelta import TextDeltas

TOK = ByteTokenizer()


def stream(ids: list[int]) -> list[str]:
    d = TextDeltas(TOK.decode)
    return [d.push(i) for i in ids] + [d.flush()]


def test_a_character_split_over_tokens_is_held_until_complete() -> None:
    ids = TOK.encode("a€b")[1:]  # '€' is three bytes, so three tokens
    assert stream(ids) == ["a", "", "", "€", "b", ""]


def test_deltas_join_to_the_full_decode() -> None:
    for seed in range(300):
        r = random.Random(seed)
        if seed % 2:
            ids = [r.randrange(0, 259) for _ in range(r.randrange(1, 40))]  # bad UTF-8 too
        else:
            ids = TOK.encode("".join(r.choice("aé€𝄞 \n") for _ in range(20)))
        assert "".join(stream(ids)) == TOK.decode(ids), (seed, ids)


def test_an_incomplete_character_at_the_end_comes_out_on_flush() -> None:
    d = TextDeltas(TOK.decode)
    assert d.push(0xE2 + 3) == ""
    assert d.flush() == "\ufffd"
