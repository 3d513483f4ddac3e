"""Λ where optuna-dashboard shows it: each outer trial's note, figure and Λ-so-far.

After every merge the trial's user attribute ``lambda_history`` holds the Λ trajectory so far
(a pruned trial keeps what it reached). When the trial's run ends, the trial gets a note
(optuna-dashboard's notes API: a Markdown table of round, step, Λ per branch and the target's
validation metric, and the trial's MLflow run) and the Λ figure as an Optuna artifact in a
file-system artifact store beside the study, which the trial's page shows when the dashboard is
started with it::

    optuna-dashboard STORAGE --artifact-dir CHECKPOINT_DIR/STUDY/artifacts
"""

from __future__ import annotations

import functools
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from fm_optuna.core._events import MergeCompleted, Observer, RunFinished, RunStarted

if TYPE_CHECKING:
    import optuna

logger = logging.getLogger(__name__)

LAMBDA_ATTR = "lambda_history"
#: The trial's MLflow run id, set by fm_optuna.tracking.study_run when the study is tracked.
RUN_ATTR = "mlflow_run_id"
FIGURE_NAME = "lambda.png"


def lambda_rows(
    branches: tuple[str, ...], merges: list[tuple[int, int, tuple[float, ...], float]]
) -> list[dict[str, float]]:
    """Λ per merge keyed by branch name: ``[{"step": 100, "target": 0.6, ...}, ...]``."""
    return [
        {"step": step, **{b: round(w, 4) for b, w in zip(branches, weights, strict=True)}}
        for _, step, weights, _ in merges
    ]


def note_markdown(
    title: str,
    branches: tuple[str, ...],
    merges: list[tuple[int, int, tuple[float, ...], float]],
    *,
    metric: str,
    run: str | None = None,
) -> str:
    """The trial's note: its MLflow run (if any) and one table row per merge."""
    lines = [f"## {title}", ""]
    if run is not None:
        lines += [f"MLflow run: {run}", ""]
    lines += [
        "| round | step | " + " | ".join(f"Λ {b}" for b in branches) + f" | {metric} |",
        "|---:|---:|" + "---:|" * (len(branches) + 1),
    ]
    for rnd, step, weights, value in merges:
        cells = " | ".join(f"{w:.3f}" for w in weights)
        lines.append(f"| {rnd} | {step} | {cells} | {value:.4g} |")
    if not merges:
        lines.append("| – | – | " + " | ".join("–" for _ in branches) + " | – |")
    return "\n".join(lines) + "\n"


class DashboardNotes(Observer):
    """Writes one outer trial's Λ where optuna-dashboard shows it (see the module docstring).

    ``higher_is_better`` turns the merge search's scores back into the target's metric (as the
    study reports it); ``run_link`` makes the Markdown for an MLflow run id (default: the id).
    """

    def __init__(
        self,
        trial: optuna.Trial,
        artifact_dir: Path,
        *,
        metric: str,
        higher_is_better: bool = True,
        run_link: Callable[[str], str] | None = None,
    ) -> None:
        self.trial = trial
        self.artifact_dir = Path(artifact_dir).resolve()
        self.metric = metric
        self.sign = 1.0 if higher_is_better else -1.0
        self.run_link = run_link
        self.branches: tuple[str, ...] = ()
        self.merges: list[tuple[int, int, tuple[float, ...], float]] = []

    def on_run_started(self, event: RunStarted) -> None:
        self.branches = tuple(event.branches)
        self.merges = [
            (rnd, step, tuple(d.weights), self.sign * d.score)
            for rnd, (step, d) in enumerate(event.resumed_merges, start=1)
        ]

    def on_merge_completed(self, event: MergeCompleted) -> None:
        self.branches = tuple(event.branches)
        self.merges.append(
            (
                event.round,
                event.step,
                tuple(event.decision.weights),
                self.sign * event.decision.score,
            )
        )
        self.trial.set_user_attr(LAMBDA_ATTR, lambda_rows(self.branches, self.merges))

    def on_run_finished(self, event: RunFinished) -> None:
        from optuna.exceptions import UpdateFinishedTrialError

        # The dashboard is a view: a failure to write it never fails the trial.
        try:
            self._write(event.status)
        except ModuleNotFoundError as missing:
            _note_no_dashboard(str(missing))
        except UpdateFinishedTrialError:  # another worker failed the trial: said once
            logger.debug("trial %d: finished elsewhere, no note", self.trial.number)
        except Exception:
            logger.warning("trial %d: no optuna-dashboard note", self.trial.number, exc_info=True)

    def _write(self, status: str) -> None:
        from optuna_dashboard import save_note

        run_id = self.trial.user_attrs.get(RUN_ATTR)
        run = None if run_id is None else (self.run_link or _code)(run_id)
        title = f"Trial {self.trial.number} · {status} · Λ per merge"
        save_note(
            self.trial,
            note_markdown(title, self.branches, self.merges, metric=self.metric, run=run),
        )
        if self.merges:
            self._upload_figure()

    def _upload_figure(self) -> None:
        from optuna.artifacts import FileSystemArtifactStore, upload_artifact

        from fm_optuna.tracking.plots import MergeRecord, plot_lambda_trajectory

        records = [MergeRecord(r, s, w, v) for r, s, w, v in self.merges]
        self.artifact_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / FIGURE_NAME
            plot_lambda_trajectory(self.branches, records, path, title=f"trial {self.trial.number}")
            upload_artifact(
                artifact_store=FileSystemArtifactStore(str(self.artifact_dir)),
                file_path=str(path),
                study_or_trial=self.trial,
                mimetype="image/png",
            )


def _code(run_id: str) -> str:
    return f"`{run_id}`"


@functools.cache
def _note_no_dashboard(reason: str) -> None:
    logger.warning("fm-optuna: no optuna-dashboard notes (%s)", reason)
