"""Which process this is, and whether another one (named the same way) is still alive.

Workers of a shared study name themselves ``host:pid``. Whether such a worker is gone can only be
told on its own host; elsewhere it is taken to be alive (callers add a time limit for that case).
"""

from __future__ import annotations

import os
import socket


def this_worker() -> str:
    """``host:pid`` of this process."""
    return f"{socket.gethostname()}:{os.getpid()}"


def process_is_gone(pid: int) -> bool:
    """True when no process ``pid`` runs on this host (never for this process itself)."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OSError):
        return False  # someone else's process: alive
    return False


def worker_is_gone(worker: str) -> bool:
    """True when ``host:pid`` names a process of this host that has ended."""
    host, _, pid = worker.rpartition(":")
    return host == socket.gethostname() and pid.isdigit() and process_is_gone(int(pid))
