"""`hybridgraph generate`: the README demo as a real subprocess, token-id prompts, bad flags."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hybridgraph.cli import main
from hybridgraph.engine import Engine

# The console script pip installs next to this interpreter (what the README runs).
SCRIPT = Path(sys.executable).parent / "hybridgraph"
ENV = {**os.environ, "PYTHONIOENCODING": "utf-8", "CUDA_VISIBLE_DEVICES": ""}


def run(*args: str, script: bool = False) -> subprocess.CompletedProcess[str]:
    cmd = [str(SCRIPT)] if script else [sys.executable, "-m", "hybridgraph.cli"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, env=ENV, timeout=120)


def test_readme_demo() -> None:
    assert SCRIPT.is_file(), "the hybridgraph console script is not installed"
    proc = run("generate", "--model", "tiny", "--prompt", "Hello, my name is", script=True)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"TTFT \d+\.\d+ ms", proc.stdout), proc.stdout
    assert re.search(r"\d+\.\d tokens/s", proc.stdout)
    # "Hello, my name is" is 17 bytes + BOS; the default is 32 new tokens, greedy on CPU.
    assert "[tiny eager on cpu] prompt 18 tokens, 32 new (length)" in proc.stdout


def test_prompt_ids_give_the_engines_tokens() -> None:
    proc = run("generate", "--model", "tiny", "--prompt-ids", "1,72,101,108", "--max-new-tokens",
               "6", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert "prompt 4 tokens, 6 new" in proc.stdout
    engine = Engine.load("tiny", device="cpu")
    res = engine.generate([1, 72, 101, 108], 6)
    assert proc.stdout.startswith(engine.tokenizer.decode(res.tokens) + "\n")


def test_bad_request_flag_is_a_clear_error_subprocess() -> None:
    proc = run("generate", "--model", "tiny", "--temperature", "-1", "--device", "cpu")
    assert proc.returncode != 0
    assert "error: temperature: must be >= 0" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(("flags", "message"), [
    (["--top-p", "1.5"], r"top_p: must be in \(0, 1\]"),
    (["--top-k", "-3"], "top_k: must be an integer in"),
    (["--max-new-tokens", "0"], "max_new_tokens: must be an integer >= 1"),
    (["--prompt-ids", "1,999"], "token id 999 is outside the vocabulary"),
    (["--prompt-ids", "1,x"], "--prompt-ids takes integers"),
    (["--seed", "-1"], "seed: must be an integer"),
])
def test_bad_values_are_clear_errors(flags: list[str], message: str,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    code = _exit_code(["generate", "--model", "tiny", "--device", "cpu", *flags])
    err = capsys.readouterr().err
    assert code != 0
    assert re.search(message, err), err


@pytest.mark.parametrize(("flags", "message"), [
    (["--dtype", "float64"], "argument --dtype: invalid choice: 'float64'"),
    (["--max-new-tokens", "abc"], "argument --max-new-tokens: invalid int value: 'abc'"),
    (["--mode", "turbo"], "argument --mode: invalid choice"),
    (["--prompt", "a", "--prompt-ids", "1"], "not allowed with argument"),
])
def test_bad_flags_are_refused_by_the_parser(flags: list[str], message: str,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["generate", "--model", "tiny", *flags])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def _exit_code(argv: list[str]) -> int:
    """main's exit status, whether returned or raised as SystemExit."""
    try:
        return main(argv)
    except SystemExit as e:
        if isinstance(e.code, int):
            return e.code
        print(e.code, file=sys.stderr)  # what the interpreter does with SystemExit("text")
        return 1


@pytest.mark.parametrize("flags", [["--model", "/nonexistent/model"], ["--mode", "graph"]])
def test_bad_model_or_mode_is_a_clean_error(flags: list[str],
                                            capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["generate", "--model", "tiny", "--device", "cpu", *flags]
    try:
        code = _exit_code(argv)
    except Exception as e:  # noqa: BLE001 - any escaping exception is the failure we test for
        pytest.fail(f"main() raised {type(e).__name__}: {e}")
    assert code != 0
    assert capsys.readouterr().err.startswith("error:")
