"""Checkpoints at every merge, written by an observer of the event stream.

A checkpoint holds the merged state, each branch's optimizer state and data-stream state, the
round, the Λ history and the RNG state, so a run (or an outer trial whose worker died) resumes
after its last merge and, with the same seed, follows the uninterrupted Λ trajectory.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from fm_optuna.core._events import MergeCompleted, Observer
from fm_optuna.errors import ConfigError, WriteFailed, invalid


def save_checkpoint(snapshot: dict[str, Any], path: Path) -> None:
    """Write atomically: a killed process (or a full disk) leaves the previous checkpoint, never
    half a file.

    Raises:
        WriteFailed: The system refused the write (``ENOSPC``, ``EROFS``, ``EACCES``); the
            previous checkpoint is intact.
    """
    path = Path(path)
    # Serialised in memory first: torch's writer reports a full disk as an opaque
    # "enforce fail at inline_container.cc", Python's file write as the OSError it is.
    buffer = io.BytesIO()
    torch.save(snapshot, buffer)
    temporary = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(
            dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"
        )
        with os.fdopen(handle, "wb") as file:
            file.write(buffer.getbuffer())
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except OSError as error:
        if temporary is not None:
            Path(temporary).unlink(missing_ok=True)
        kept = "the previous checkpoint is intact" if path.exists() else ""
        raise WriteFailed(path, error.strerror or type(error).__name__, note=kept) from None
    except BaseException:
        if temporary is not None:
            Path(temporary).unlink(missing_ok=True)
        raise


def probe_writable(folder: Path | str, *, parameter: str) -> None:
    """Raise a one-line ConfigError unless files can be created in ``folder`` (or, when it does
    not exist yet, in the nearest folder above it, where it will be created); write nothing.

    Every command probes the places it will write before it trains, so a read-only or
    forbidden folder is one line at start rather than a traceback after the training.
    """
    folder = Path(folder)
    nearest = folder
    while not nearest.exists():
        if nearest.parent == nearest:
            break
        nearest = nearest.parent
    why = None
    if not nearest.is_dir():
        why = f"{nearest} is not a folder"
    else:
        try:
            handle, probe = tempfile.mkstemp(dir=nearest, prefix=".fm-optuna-probe-")
            os.close(handle)
            os.unlink(probe)
        except OSError as error:
            why = f"cannot write in {nearest}: {error.strerror}"
    if why is not None:
        raise invalid(parameter, folder, f"a folder this process can write in ({why})")


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    """The checkpoint at ``path``, or ``None`` when there is none yet.

    Raises:
        ConfigError: The file is not a whole checkpoint (truncated, corrupt, another format).
    """
    path = Path(path)
    if not path.exists():
        return None
    try:
        # Our own files only: tensors, plain containers and generator states.
        snapshot = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # zip, pickle, EOF and torch errors alike: the file is unusable
        raise _unreadable(path, error) from None
    if not isinstance(snapshot, dict):
        raise _unreadable(path, TypeError(f"holds a {type(snapshot).__name__}"))
    return snapshot


def _unreadable(path: Path, error: BaseException) -> ConfigError:
    lines = str(error).strip().splitlines()
    why = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    return invalid("checkpoint", path, f"a whole fm-optuna checkpoint (it cannot be read: {why})")


def _held(handle: Any, path: Path, parameter: str) -> ConfigError:
    handle.seek(0)
    owner = handle.read().strip() or "another process"
    return invalid(
        parameter,
        path,
        f"a checkpoint no other run is writing (process {owner} is using it: give this "
        "run its own --checkpoint, or wait for that one)",
    )


def check_unlocked(path: Path | str, *, parameter: str) -> None:
    """Raise the one line of :func:`checkpoint_lock` if another process holds ``path``'s lock
    now; create nothing (a command checks this before it opens any store)."""
    import fcntl

    path = Path(path)
    lock = path.with_name(path.name + ".lock")
    if not lock.is_file():
        return  # no lock file: nobody holds it
    with open(lock) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _held(handle, path, parameter) from None
        fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def checkpoint_lock(path: Path | str, *, parameter: str) -> Iterator[None]:
    """Hold ``<path>.lock`` while this process writes the checkpoint ``path``: a second run
    given the same file is one line at start instead of two runs silently sharing it."""
    import fcntl  # POSIX, as the machines running fm-optuna are

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.with_name(path.name + ".lock")
    with open(lock, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _held(handle, path, parameter) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class Checkpointer(Observer):
    """Saves the run's snapshot to ``path`` after every merge."""

    wants_snapshots = True

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.saved_rounds: list[int] = []

    def on_merge_completed(self, event: MergeCompleted) -> None:
        if event.snapshot is None:
            return
        save_checkpoint(event.snapshot(), self.path)
        self.saved_rounds.append(event.round)
