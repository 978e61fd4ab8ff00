"""generation_config.json: end ids used with config.json's, and sampling defaults."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from hybridgraph.engine import Engine
from hybridgraph.model.config import ConfigError
from hybridgraph.model.generation import GenerationDefaults, generation_defaults, merge_eos


def test_greedy_unless_the_checkpoint_samples() -> None:
    assert generation_defaults({"eos_token_id": [1, 2]}) == GenerationDefaults((1, 2))
    d = generation_defaults({"do_sample": True, "temperature": 0.6, "top_p": 0.9,
                             "eos_token_id": 7})
    assert (d.temperature, d.top_k, d.top_p, d.eos_token_ids) == (0.6, 50, 0.9, (7,))


@pytest.mark.parametrize("bad, field", [({"eos_token_id": "x"}, "eos_token_id"),
                                        ({"do_sample": True, "temperature": "hot"}, "temperature"),
                                        ({"max_new_tokens": 0}, "max_new_tokens")])
def test_bad_fields_are_named(bad: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        generation_defaults(bad)


def test_merge_keeps_every_id_once() -> None:
    assert merge_eos((128001,), (128001, 128008, 128009)) == (128001, 128008, 128009)


def test_an_end_id_listed_only_in_generation_config_stops(gqa_checkpoint, tmp_path: Path) -> None:
    # Meta-Llama-3-8B-Instruct at release: config.json names <|end_of_text|>, the
    # end-of-turn <|eot_id|> is only in generation_config.json.
    directory, _ = gqa_checkpoint
    model_dir = Path(shutil.copytree(directory, tmp_path / "llama3ish"))
    prompt = [1, 5, 6, 7]
    free = Engine.load(str(model_dir), device="cpu", max_seq_len=64).generate(
        prompt, 8, ignore_eos=True).tokens
    k = next(i for i in range(1, len(free)) if free[i] not in free[:i] and free[i] != 2)
    eot = free[k]
    (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, eot]}))
    engine = Engine.load(str(model_dir), device="cpu", max_seq_len=64)
    assert set(engine.config.eos_token_ids) == {2, eot}
    res = engine.generate(prompt, 8)
    assert res.tokens == free[:k + 1] and res.finish_reason == "stop"
    # ignore_eos runs past it.
    assert engine.generate(prompt, 8, ignore_eos=True).tokens == free
