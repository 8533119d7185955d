"""Claim tokens of batch runs, and whether the process that made one is gone.

A run of a batch claims its images under a token (:func:`new_claim`) that starts with its process id, so that a
worker on the same machine (a sibling pool process, or the worker's main process answering another worker's
question, :mod:`worker.control`) can tell whether the run's process still exists. Torch-free: the prefork
parent imports it.
"""

from __future__ import annotations

import os
import uuid


def new_claim() -> str:
    """A run's claim token: this process's id (8 hex digits, so a sibling process of the same worker can tell
    whether it is still alive: :func:`holder_process_gone`), then 24 random ones."""
    return f"{os.getpid() & 0xFFFFFFFF:08x}{uuid.uuid4().hex[:24]}"


def holder_process_gone(holder: str) -> bool:
    """Whether the process that made claim ``holder`` (:func:`new_claim`), a process of this machine's worker, no
    longer exists. Only a certain absence counts: this process itself, one alive, one this user may not signal
    and a claim from before tokens carried a process id are all taken as alive, so their leases are waited out."""
    try:
        pid = int(holder[:8], 16)
    except (TypeError, ValueError):
        return False
    if pid <= 1 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False
