"""MLflow for the outer study: one parent run per study, one ForkMerge run per outer trial.

Every outer trial's ForkMerge run (with its branch child runs) hangs under the study's run, is
tagged with the study name and trial number, ends FINISHED / KILLED (pruned) / FAILED, and its
run id is stored on the Optuna trial as the user attribute ``mlflow_run_id``. The study run's id
lives in the Optuna study's user attributes, so every worker of a shared study logs under it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from mlflow.entities import RunTag
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from fm_optuna.events import Observer, RunStarted
from fm_optuna.tracking.observer import MlflowTracker
from fm_optuna.tracking.uris import browse_command

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial

    from fm_optuna.tracking.store import TrackingStore

STUDY_RUN_ATTR = "mlflow_study_run_id"
TRIAL_RUN_ATTR = "mlflow_run_id"


class _RecordRunId(Observer):
    """Stores the trial's MLflow run id on the Optuna trial as soon as the run exists."""

    def __init__(self, trial: optuna.Trial, tracker: MlflowTracker) -> None:
        self.trial, self.tracker = trial, tracker

    def on_run_started(self, event: RunStarted) -> None:
        run_id = self.tracker.run_id(event.run)
        if run_id is not None:
            self.trial.set_user_attr(TRIAL_RUN_ATTR, run_id)


class StudyTracking:
    """Creates (or finds) the study's MLflow run and a tracker for each outer trial."""

    def __init__(self, store: TrackingStore, study_name: str, *, higher_is_better: bool) -> None:
        self.store = store
        self.study_name = study_name
        self.higher_is_better = higher_is_better
        self.study_run_id: str | None = None

    def _study_run(self, study: optuna.Study) -> str:
        """The study's run, the same for every worker even when they start together.

        The earliest run tagged as this study's wins: a worker that finds none creates one and
        then adopts the earliest it can see, so two workers creating at once agree (a run that
        lost such a race stays behind, empty; it is never deleted under another worker's feet).
        """
        if self.study_run_id is None:
            runs = self._study_runs()
            if not runs:
                self.store.client.create_run(
                    self.store.experiment_id,
                    run_name=f"study-{self.study_name}",
                    tags={"fm_optuna.role": "study", "optuna.study": self.study_name},
                )
                runs = self._study_runs()
            self.study_run_id = runs[0].info.run_id
            if study.user_attrs.get(STUDY_RUN_ATTR) != self.study_run_id:
                study.set_user_attr(STUDY_RUN_ATTR, self.study_run_id)
        return self.study_run_id

    def _study_runs(self) -> list[Any]:
        runs = self.store.client.search_runs(
            [self.store.experiment_id],
            f"tags.`fm_optuna.role` = 'study' and tags.`optuna.study` = '{self.study_name}'",
        )
        return sorted(runs, key=lambda run: (run.info.start_time, run.info.run_id))

    def observers(self, trial: optuna.Trial, config: Any) -> Sequence[Observer]:
        tags = {
            MLFLOW_PARENT_RUN_ID: self._study_run(trial.study),
            "optuna.study": self.study_name,
            "optuna.trial": str(trial.number),
        }
        tracker = MlflowTracker(
            self.store,
            tags=tags,
            run_prefix=f"trial{trial.number}-",
            higher_is_better=self.higher_is_better,
        )
        return [tracker, _RecordRunId(trial, tracker)]

    def mark_dead(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """A trial whose worker died: its run (left RUNNING by the dead process) becomes FAILED."""
        run_id = trial.user_attrs.get(TRIAL_RUN_ATTR)
        if run_id is None:
            return
        try:
            self.store.client.log_batch(run_id, tags=[RunTag("fm_optuna.status", "FAIL")])
            self.store.client.set_terminated(run_id, status="FAILED")
        except Exception:  # the store is best effort here: the study itself must go on
            return

    def finish(self, best_trial: int | None, best_value: float | None, n_trials: int) -> None:
        if self.study_run_id is None:
            return
        tags = [RunTag("fm_optuna.trials", str(n_trials))]
        if best_trial is not None:
            tags += [RunTag("best_trial", str(best_trial)), RunTag("best_value", f"{best_value}")]
        self.store.client.log_batch(self.study_run_id, tags=tags)

    def browse(self) -> list[str]:
        command = browse_command(self.store.uri, self.store.experiment_name)
        lines = [
            f"MLflow experiment {self.store.experiment_name!r} in {self.store.display_uri}: "
            f"{command}"
        ]
        if self.study_run_id is not None:
            lines.append(
                f"MLflow study run study-{self.study_name} ({self.study_run_id}): every trial's "
                "ForkMerge run below it, its overview showing the Λ table"
            )
        return lines
