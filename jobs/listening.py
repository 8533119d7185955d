"""Why a server command ('deblur flower', 'deblur api') could not listen where it was told to, in one line that
names the option to change: torch-free, for the producer's commands and the worker's alike."""

from __future__ import annotations

import errno
import json
import socket

from jobs.settings import stack_file

LISTEN_FAILURE_EXIT = 2
"""Exit code of a server command ('deblur flower', 'deblur api') that cannot listen where it was told to: a
setting to change (as 2 means for the other commands: invalid input or settings), not a service that did not
answer (1)."""


def listen_failure(exc: OSError, address: str, port: int, option: str, variable: str) -> str | None:
    """One line saying why a server could not listen on ``address``:``port`` and which option (or environment
    variable) to change, or None when ``exc`` is not such a failure."""
    where = f"{address}:{port}" if ":" not in address else f"[{address}]:{port}"
    if exc.errno == errno.EADDRINUSE:
        taken = f"port {port} on {address} is already in use"
        if port == _stack_flower_port():
            taken += f" by the local stack's Flower (open http://{where}/)"
        return f"{taken}; choose a free one with {option} N (or {variable})"
    if exc.errno == errno.EACCES:
        return f"no permission to listen on {where} (ports below 1024 need privileges); choose another with {option}"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"cannot listen on {where}: {address} is not an address of this machine; choose another with --address"
    return None


def _stack_flower_port() -> int | None:
    """The port of the running local stack's Flower ('deblur stack up'), or None."""
    try:
        port = json.loads(stack_file().read_text()).get("flower_port")
    except (OSError, ValueError, AttributeError):
        return None
    return port if isinstance(port, int) else None


def probe_listen(address: str, port: int) -> None:
    """Bind ``address``:``port`` as a server would (SO_REUSEADDR: a dead server's closing sockets do not count)
    and let go at once; raises the OSError a server would meet there."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, port))
