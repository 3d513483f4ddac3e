"""Progress, fed by the event stream: a tqdm bar per run on a terminal, and one line per merge
round and per finished run when the output goes to a file, a pipe or a notebook (where bars are
off and nothing would otherwise show that training goes on)."""

from __future__ import annotations

import math
import sys
import time
from typing import IO

from tqdm.auto import tqdm

from fm_optuna.core._events import (
    MergeCompleted,
    Observer,
    RunFinished,
    RunStarted,
    TrainingProgress,
)


def progress_stream(*, json_output: bool = False) -> IO[str] | None:
    """Where progress lines go: ``None`` on a terminal (the bars show progress there), stdout
    when it is a log file or a pipe (``make run > log``), else stderr (``--json`` keeps stdout
    for the JSON document)."""
    if sys.stdout.isatty() and sys.stderr.isatty():
        return None
    if json_output or sys.stdout.isatty():
        return sys.stderr
    return sys.stdout


class ProgressLines(Observer):
    """One line per merge round and per finished run, flushed at once (for logs).

    Args:
        stream: Where lines go (see :func:`progress_stream`).
        prefix: Put before every line, e.g. ``trial 3``.
    """

    def __init__(self, stream: IO[str], *, prefix: str = "") -> None:
        self.stream = stream
        self.prefix = f"{prefix} " if prefix else ""
        self._rounds: dict[str, int | None] = {}
        self._started: dict[str, float] = {}

    def _print(self, text: str) -> None:
        print(f"{self.prefix}{text}", file=self.stream, flush=True)

    def on_run_started(self, event: RunStarted) -> None:
        dt = int(event.params.get("dt", 0) or 0)
        forks = bool(event.branches) and dt > 0
        self._rounds[event.run] = math.ceil(event.total_steps / dt) if forks else None
        self._started[event.run] = time.perf_counter()
        what = f" with branches {', '.join(event.branches)}" if event.branches else ""
        self._print(f"[{event.run}] started: {event.total_steps} steps{what}")

    def on_merge_completed(self, event: MergeCompleted) -> None:
        rounds = self._rounds.get(event.run)
        lam = " ".join(
            f"{b}={w:.2f}" for b, w in zip(event.branches, event.decision.weights, strict=True)
        )
        # The target's metrics as the user knows them (MAE, not the oriented −MAE); the gain
        # over the best branch is oriented, so positive always means the merge is better.
        metrics = " ".join(f"{name} {value:.4g}" for name, value in event.merged_metrics.items())
        self._print(
            f"[{event.run}] round {event.round}/{rounds or '?'} step {event.step}: Λ {lam}  "
            f"val {metrics} (merge better than the best branch by {event.gain:+.3g})"
        )

    def on_run_finished(self, event: RunFinished) -> None:
        seconds = time.perf_counter() - self._started.pop(event.run, time.perf_counter())
        summary = event.summary
        scores = "".join(
            f" {label} {value:.2f}"
            for value, label in ((summary.target_val, "val"), (summary.target_test, "test"))
            if value is not None
        )
        self._print(f"[{event.run}] {event.status.lower()}{scores} in {seconds:.1f} s")


class ProgressBars(Observer):
    """One bar per run counting optimizer steps over all its branches (stderr, TTY only)."""

    def __init__(self, *, disable: bool | None = None) -> None:
        self._disable = (not sys.stderr.isatty()) if disable is None else disable
        self._bar: tqdm | None = None
        self._seen: dict[str, int] = {}

    def on_run_started(self, event: RunStarted) -> None:
        branches = max(1, len(event.branches))
        self._seen = {}
        self._bar = tqdm(
            total=event.total_steps * branches,
            desc=event.run,
            unit="step",
            leave=False,
            disable=self._disable,
            file=sys.stderr,
        )

    def on_training_progress(self, event: TrainingProgress) -> None:
        if self._bar is None:
            return
        done = event.step - self._seen.get(event.branch, 0)
        self._seen[event.branch] = event.step
        self._bar.update(done)

    def on_merge_completed(self, event: MergeCompleted) -> None:
        if self._bar is not None:
            lam = " ".join(f"{w:.2f}" for w in event.decision.weights)
            self._bar.set_postfix_str(
                f"round {event.round} Λ=[{lam}] val={event.decision.score:.2f}"
            )

    def on_run_finished(self, event: RunFinished) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
