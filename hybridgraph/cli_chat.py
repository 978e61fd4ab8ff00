"""The CLI's text side: prompts from chat messages, text streamed to the terminal as it is
generated, and `hybridgraph chat`, an interactive conversation."""

from __future__ import annotations

import argparse
import sys
from typing import Any, TextIO

DEFAULT_MAX_NEW_TOKENS = 256  # when neither the command line nor the checkpoint says


def add_text_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="end generation where the text contains TEXT (left out); repeatable")
    p.add_argument("--ignore-eos", action="store_true",
                   help="do not stop at the model's end-of-sequence / end-of-turn ids")
    p.add_argument("--system", default=None, help="a system message (chat prompts)")


def chat_messages(args: argparse.Namespace, prompt: str) -> list[dict[str, str]]:
    system = [{"role": "system", "content": args.system}] if args.system else []
    return [*system, {"role": "user", "content": prompt}]


def sampling_from_args(args: argparse.Namespace, engine: Any) -> Any:
    """--temperature/--top-k/--top-p where given, else the checkpoint's defaults
    (generation_config.json; greedy when it has none)."""
    from hybridgraph.request import SamplingParams

    g = engine.generation

    def pick(given: Any, default: Any) -> Any:
        return default if given is None else given

    return SamplingParams(pick(args.temperature, g.temperature), pick(args.top_k, g.top_k),
                          pick(args.top_p, g.top_p), args.seed)


def stream_generate(engine: Any, ids: list[int], args: argparse.Namespace,
                    out: TextIO = sys.stdout) -> Any:
    """Generate, writing each token's text as it arrives; returns the GenerationResult."""
    def on_text(row: int, token: int, delta: str) -> None:
        if delta:
            out.write(delta)
            out.flush()

    max_new = args.max_new_tokens
    if max_new is None:
        # The default never asks for more than the cache holds: a long answer ends at the
        # context limit. A number given is the engine's to accept or refuse.
        max_new = max(1, min(engine.generation.max_new_tokens or DEFAULT_MAX_NEW_TOKENS,
                             engine.max_seq_len - len(ids)))
    res = engine.generate(ids, max_new, sampling_from_args(args, engine), stop=args.stop,
                          ignore_eos=args.ignore_eos, on_text=on_text)
    out.write("\n")
    out.flush()
    return res


def cmd_chat(args: argparse.Namespace) -> int:
    """Read a line, answer it (streamed), keep the conversation; /reset forgets it, /exit or
    end of input ends it."""
    from hybridgraph.engine import EngineConfig
    from hybridgraph.model.chat import chat_prompt_ids
    from hybridgraph.parallel.engine import load_engine
    from hybridgraph.request import RequestError

    # With --tp N this is rank 0 (the other ranks follow it: hybridgraph/parallel).
    engine = load_engine(args.model, EngineConfig.from_args(args, progress=True))
    if engine.tokenizer.chat_template is None:
        print("error: this model has no chat template; pass --chat-template (a .jinja file or "
              "the template text)", file=sys.stderr)
        return 2
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict[str, str]] = []
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"[{engine.config.name} on {engine.device}] /reset forgets, /exit ends",
              file=sys.stderr)
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            return 0
        line = line.strip()
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            history = []
            continue
        if not line:
            continue
        turn = [*history, {"role": "user", "content": line}]
        try:
            ids = chat_prompt_ids(engine.tokenizer, system + turn)
            if len(ids) >= engine.max_seq_len:
                raise RequestError("messages", f"the conversation is {len(ids)} tokens, the "
                                               f"context holds {engine.max_seq_len}; /reset")
            res = stream_generate(engine, ids, args)
        except RequestError as e:
            print(f"error: {e}", file=sys.stderr)
            continue
        history = [*turn, {"role": "assistant", "content": res.text or ""}]
