"""The server's socket file: path checks, stale-socket replacement, a 0600 bind."""

from __future__ import annotations

import logging
import os
import socket
import stat

log = logging.getLogger("hybridgraph.server")

MAX_SOCKET_PATH_BYTES = 107  # sun_path is 108 bytes including the terminating NUL


class ServeError(Exception):
    """The server can't start (bad or busy socket path)."""


def check_socket_path(path: str) -> None:
    """Refuse a path we can't or mustn't use; remove a stale socket a dead server left."""
    if len(os.fsencode(path)) > MAX_SOCKET_PATH_BYTES:
        raise ServeError(f"socket path is {len(os.fsencode(path))} bytes; AF_UNIX allows at "
                         f"most {MAX_SOCKET_PATH_BYTES}: {path}")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        parent = os.path.dirname(path) or "."
        if not os.path.isdir(parent):
            raise ServeError(f"cannot create socket {path}: {parent} is not a directory "
                             f"(or does not exist)") from None
        return
    except OSError as e:  # e.g. a path component that is a file
        raise ServeError(f"cannot use socket path {path}: {e.strerror}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise ServeError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        try:
            os.unlink(path)  # nobody listens: a dead server's leftover
        except OSError as e:
            raise ServeError(f"cannot remove the stale socket {path} (no server listens "
                             f"on it): {e.strerror}") from None
        log.info("removed stale socket %s", path)
        return
    except OSError as e:  # a full backlog or a timeout means someone is there
        raise ServeError(f"socket {path} is in use or unreachable ({e}); refusing to "
                         f"replace it") from None
    finally:
        probe.close()
    raise ServeError(f"another server is already listening on {path}")


def bind_socket(path: str) -> socket.socket:
    check_socket_path(path)  # again: the model load took a while
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # created 0600, with no window where others could connect
    try:
        sock.bind(path)
    except OSError as e:
        sock.close()
        raise ServeError(f"cannot bind {path}: {e}") from None
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(128)
    sock.setblocking(False)
    return sock
