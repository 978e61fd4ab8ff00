"""Start a `hybridgraph serve` process and wait until it is ready (tests, benchmarks).

    with ServerProcess("/tmp/hg.sock", model="tiny", extra=["--device", "cpu"]) as srv:
        Client(srv.socket_path).generate(...)
    with ServerProcess(None, http="127.0.0.1:0") as srv:   # srv.http_url: the bound address
        ...
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence


class ServerProcess:
    def __init__(self, socket_path: str | None, model: str = "tiny", extra: Sequence[str] = (),
                 ready_timeout_s: float = 300.0, env: dict[str, str] | None = None,
                 http: str | None = None) -> None:
        self.socket_path = socket_path
        self.http_url: str | None = None  # from the ready line, once ready
        self.cmd = [sys.executable, "-m", "hybridgraph.cli", "serve", "--model", model,
                    *(["--socket", socket_path] if socket_path is not None else []),
                    *(["--http", http] if http is not None else []), *extra]
        self.ready_timeout_s = ready_timeout_s
        self.env = env
        self.lines: list[str] = []
        self.proc: subprocess.Popen[str] | None = None
        self._ready = threading.Event()

    def start(self) -> ServerProcess:
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True, env=self.env)
        # Keep draining stderr for the server's whole life: a full pipe would block its
        # logging and so the server itself.
        threading.Thread(target=self._drain, daemon=True).start()
        deadline = time.monotonic() + self.ready_timeout_s
        while not self._ready.wait(0.05):
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} before ready:\n"
                                   + self.log())
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"server not ready in {self.ready_timeout_s} s:\n" + self.log())
        return self

    def _drain(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            if "ready: " in line and (self.socket_path is None or self.socket_path in line):
                url = re.search(r"http://\S+", line)
                self.http_url = url.group(0) if url else None
                self._ready.set()

    def log(self) -> str:
        return "".join(self.lines)

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM, then wait; returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> ServerProcess:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        try:
            self.stop()
        finally:
            self.kill()
