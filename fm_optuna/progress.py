"""Terminal progress: a tqdm bar per run, fed by the event stream."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm

from fm_optuna.events import MergeCompleted, Observer, RunFinished, RunStarted, TrainingProgress


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
