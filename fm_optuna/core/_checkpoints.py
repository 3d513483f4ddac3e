"""Checkpoints at every merge, written by an observer of the event stream.

A checkpoint holds the merged state, each branch's optimizer state and data-stream state, the
round, the Λ history and the RNG state, so a run (or an outer trial whose worker died) resumes
after its last merge and, with the same seed, follows the uninterrupted Λ trajectory.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from fm_optuna.core._events import MergeCompleted, Observer
from fm_optuna.errors import ConfigError, invalid


def save_checkpoint(snapshot: dict[str, Any], path: Path) -> None:
    """Write atomically: a killed process leaves the previous checkpoint, never half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(snapshot, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


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
