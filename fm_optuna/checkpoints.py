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

from fm_optuna.events import MergeCompleted, Observer


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
    """The checkpoint at ``path``, or ``None`` when there is none yet."""
    if not path.exists():
        return None
    # Our own files only: tensors, plain containers and generator states.
    return torch.load(path, map_location="cpu", weights_only=False)


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
