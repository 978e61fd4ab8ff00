"""`hybridgraph serve`: check the addresses, load the engine (the HTTP port answering
503 "starting" meanwhile), then run the Server with its fronts until it is stopped."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys

from hybridgraph.server.limits import Limits
from hybridgraph.server.server import Server
from hybridgraph.server.sockets import ServeError, check_socket_path


def serve_main(args: argparse.Namespace) -> int:
    """`hybridgraph serve`: load, capture ahead (with a progress bar), serve until stopped."""
    http_spec = getattr(args, "http", None)
    if args.socket is None and http_spec is None:
        print("error: give --socket PATH, --http HOST:PORT, or both", file=sys.stderr)
        return 1
    http_sock = None
    try:
        limits = Limits.from_args(args)
        if args.socket is not None:
            check_socket_path(args.socket)
        if http_spec is not None:
            from hybridgraph.server.http import bind_tcp, parse_address

            http_sock = bind_tcp(*parse_address(http_spec))  # a busy port fails before the load
    except (ServeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    from hybridgraph.engine_config import EngineConfig
    from hybridgraph.parallel.engine import load_engine
    from hybridgraph.server.starting import StartingResponder

    # The HTTP port answers 503 "starting" while the model loads. With --tp N this is
    # rank 0 (the other ranks follow it: hybridgraph/parallel).
    with StartingResponder(http_sock) if http_sock is not None else contextlib.nullcontext():
        engine = load_engine(args.model, EngineConfig.from_args(args, progress=True))
    server = Server(engine, args.socket, limits)
    if http_sock is not None:
        from hybridgraph.server.http import http_front

        try:
            server.fronts.append(http_front(server, args, http_sock))
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    try:
        return asyncio.run(server.run())
    except ServeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
