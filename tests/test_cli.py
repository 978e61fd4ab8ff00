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
    # The README's main command: the embedded real model answers in English, streamed.
    assert SCRIPT.is_file(), "the hybridgraph console script is not installed"
    proc = run("generate", "--model", "smollm2-135m", "--chat", "--prompt",
               "What is the capital of France?", script=True)
    assert proc.returncode == 0, proc.stderr
    answer, stats = proc.stdout.rsplit("\n[", 1)
    assert "Paris" in answer and "<|im_end|>" not in answer
    assert re.search(r"eager on cpu\] prompt \d+ tokens, \d+ new \(stop\); TTFT \d+\.\d+ ms",
                     stats), stats
    assert re.search(r"\d+\.\d tokens/s", stats)


def test_random_preset_demo() -> None:
    proc = run("generate", "--model", "tiny", "--prompt", "Hello, my name is",
               "--max-new-tokens", "32")
    assert proc.returncode == 0, proc.stderr
    # "Hello, my name is" is 17 bytes + BOS; greedy on CPU.
    assert "[tiny eager on cpu] prompt 18 tokens, 32 new (length)" in proc.stdout


def test_stop_string_and_chat_template_flags() -> None:
    # A template given on the command line; a stop string ends the text and is left out.
    base = ["generate", "--model", "tiny", "--chat", "--chat-template",
            "{% for m in messages %}{{ m['content'] }}{% endfor %}", "--prompt", "Hi",
            "--max-new-tokens", "40", "--ignore-eos"]
    free = run(*base)
    assert free.returncode == 0, free.stderr
    assert "prompt 2 tokens" in free.stdout  # "Hi" as bytes, no BOS: the template owns it
    text = free.stdout.rsplit("\n[", 1)[0]
    stop = text[8:11]
    proc = run(*base, "--stop", stop)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.rsplit("\n[", 1)[0] == text[:text.find(stop)]
    assert "(stop)" in proc.stdout


def test_chat_without_a_template_is_a_clear_error() -> None:
    proc = run("generate", "--model", "tiny", "--chat", "--prompt", "Hi")
    assert proc.returncode == 2
    assert "no chat template; pass --chat-template" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_chat_command_keeps_the_conversation() -> None:
    proc = subprocess.run([sys.executable, "-m", "hybridgraph.cli", "chat", "--max-new-tokens",
                           "24"], input="What is the capital of France?\n/reset\n/exit\n",
                          capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout


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


def test_chat_command_without_a_template_is_refused_at_start() -> None:
    proc = subprocess.run([sys.executable, "-m", "hybridgraph.cli", "chat", "--model", "tiny"],
                          input="hi\n", capture_output=True, text=True, env=ENV, timeout=120)
    assert proc.returncode == 2
    assert "no chat template; pass --chat-template" in proc.stderr
