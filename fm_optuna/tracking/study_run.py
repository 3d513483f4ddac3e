"""MLflow for the outer study: one parent run per study, one ForkMerge run per outer trial.

Every outer trial's ForkMerge run (with its branch child runs) hangs under the study's run, is
tagged with the study name and trial number, ends FINISHED / KILLED (pruned) / FAILED, and its
run id is stored on the Optuna trial as the user attribute ``mlflow_run_id``. The study run's id
lives in the Optuna study's user attributes, so every worker of a shared study logs under it.

The study run is RUNNING while an invocation works on the study and ends (FINISHED, or FAILED /
KILLED when the invocation fails or is interrupted) with the study's best value and parameters
as metrics (``best/value``, ``best/<param>``; categorical parameters as tags), step = finished
trials; the next invocation reopens it. A dead worker's trial run and its branch runs are
marked FAILED by the worker that notices the death.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from mlflow.entities import Metric, RunTag
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NOTE

from fm_optuna.core._events import Observer, RunStarted
from fm_optuna.study._fingerprint import TRIAL_FINGERPRINT_ATTR, TRIAL_VERSION_ATTR
from fm_optuna.study._shared_baselines import RESULT as BASELINE_RESULT
from fm_optuna.tracking.notes import TrialRow, study_note
from fm_optuna.tracking.observer import MlflowTracker, _now_ms, artifact_url, metric_key
from fm_optuna.tracking.store import owner_tags
from fm_optuna.tracking.uris import browse_command, is_server, mask_uri

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial

    from fm_optuna.tracking.store import TrackingStore

logger = logging.getLogger("fm_optuna.tracking")

STUDY_RUN_ATTR = "mlflow_study_run_id"
_STATES = ("COMPLETE", "PRUNED", "FAIL", "RUNNING")
TRIAL_RUN_ATTR = "mlflow_run_id"
#: The study run's tag naming the best complete trial's MLflow run (what `fm-optuna ui` links).
BEST_RUN_TAG = "fm_optuna.best_run_id"
BASELINE_TAG = "fm_optuna.baseline_key"


def _best_trial(study: optuna.Study) -> FrozenTrial | None:
    """The best COMPLETE trial (Optuna's ``best_trial`` never is a pruned or failed one)."""
    try:
        return study.best_trial
    except ValueError:  # no complete trial yet
        return None


def _best_run_id(study: optuna.Study) -> str | None:
    best = _best_trial(study)
    return None if best is None else best.user_attrs.get(TRIAL_RUN_ATTR)


def _row(trial: FrozenTrial) -> TrialRow:
    reason = trial.user_attrs.get("fail_reason")
    if reason is None and trial.state.name == "PRUNED" and trial.intermediate_values:
        reason = f"pruned after step {max(trial.intermediate_values)}"
    return TrialRow(
        trial.number,
        trial.state.name,
        dict(trial.params),
        trial.value,
        None if reason is None else str(reason),
        trial.user_attrs.get(TRIAL_RUN_ATTR),
    )


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
        self.best_run_id: str | None = None  # the best COMPLETE trial's run, once finished
        self._baseline_runs: dict[str, str] = {}  # study user attribute → its MLflow run

    def start(self, study: optuna.Study) -> None:
        """Find (or create) the study's run and mark it RUNNING for this invocation."""
        run_id = self._study_run(study)
        client = self.store.client
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in owner_tags().items()])
        client.update_run(run_id, status="RUNNING")

    def _study_run(self, study: optuna.Study) -> str:
        """The study's run, the same for every worker even when they start together.

        The earliest run tagged as this study's wins: a worker that finds none creates one and
        then adopts the earliest it can see, so two workers creating at once agree; the run that
        lost such a race is ended and deleted by the worker that created it.
        """
        if self.study_run_id is None:
            runs = self._study_runs()
            created = None
            if not runs:
                created = self.store.client.create_run(
                    self.store.experiment_id,
                    run_name=f"study-{self.study_name}",
                    tags={
                        "fm_optuna.role": "study",
                        "optuna.study": self.study_name,
                        **owner_tags(),
                    },
                ).info.run_id
                runs = self._study_runs()
            self.study_run_id = runs[0].info.run_id
            if created is not None and created != self.study_run_id:
                self.store.client.set_terminated(created, status="KILLED")
                self.store.client.delete_run(created)
            if study.user_attrs.get(STUDY_RUN_ATTR) != self.study_run_id:
                try:
                    study.set_user_attr(STUDY_RUN_ATTR, self.study_run_id)
                except Exception:  # workers racing to insert the same attribute
                    if study.user_attrs.get(STUDY_RUN_ATTR) != self.study_run_id:
                        raise
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
        # The configuration the trial trains with (see fm_optuna.study._fingerprint), so runs
        # of a study continued after a change can be told apart in MLflow too.
        attrs = trial.user_attrs
        for attr in (TRIAL_VERSION_ATTR, TRIAL_FINGERPRINT_ATTR):
            if attr in attrs:
                tags[f"fm_optuna.{attr}"] = str(attrs[attr])
        tracker = MlflowTracker(
            self.store,
            tags=tags,
            run_prefix=f"trial{trial.number}-",
            higher_is_better=self.higher_is_better,
        )
        return [tracker, _RecordRunId(trial, tracker)]

    def mark_dead(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """A trial whose worker died: its run and its branch runs (left RUNNING by the dead
        process, or already ended KILLED by a later invocation's sweep) become FAILED."""
        run_id = trial.user_attrs.get(TRIAL_RUN_ATTR)
        if run_id is None:
            return
        client = self.store.client
        try:
            children = client.search_runs(
                [self.store.experiment_id],
                f"tags.`mlflow.parentRunId` = '{run_id}'",
            )
            tags = [RunTag("fm_optuna.status", "FAIL")]
            reason = trial.user_attrs.get("fail_reason")  # why (the storage wrote it)
            if reason is not None:
                tags.append(RunTag("fm_optuna.fail_reason", str(reason)[:5000]))
            for run in [*children, client.get_run(run_id)]:
                client.log_batch(run.info.run_id, tags=tags)
                client.set_terminated(run.info.run_id, status="FAILED")
        except Exception:  # the store is best effort here: the study itself must go on
            return

    def finish(self, study: optuna.Study, *, status: str = "FINISHED") -> None:
        """End the study's run for this invocation with the study's best so far. Best effort:
        it runs in a ``finally``, where a store failure would hide how the study ended."""
        if self.study_run_id is None:
            return
        with self._best_effort(f"ending the study run ({status})"):
            self._finish(study, status)

    def _finish(self, study: optuna.Study, status: str) -> None:
        trials = study.get_trials(deepcopy=False)
        counts = {state: sum(t.state.name == state for t in trials) for state in _STATES}
        finished = counts["COMPLETE"] + counts["PRUNED"]
        stamp = _now_ms()
        metrics = [
            Metric(f"trials/{s.lower()}", float(n), stamp, finished) for s, n in counts.items()
        ]
        tags = [RunTag("fm_optuna.trials", str(len(trials)))]
        complete = [t for t in trials if t.state.name == "COMPLETE" and t.value is not None]
        if complete:
            best = study.best_trial
            metrics.append(Metric("best/value", float(best.value), stamp, finished))
            tags += [
                RunTag("best_trial", str(best.number)),
                RunTag("best_value", f"{best.value}"),
                RunTag("best_params", json.dumps(best.params, sort_keys=True)),
            ]
            for name, value in best.params.items():
                key = f"best/{metric_key(name)}"
                if isinstance(value, int | float) and math.isfinite(value):
                    metrics.append(Metric(key, float(value), stamp, finished))
                else:
                    tags.append(RunTag(key, str(value)))
        best_run = self.best_run_id = _best_run_id(study)
        if best_run is not None:
            tags.append(RunTag(BEST_RUN_TAG, best_run))
        tags.append(RunTag(MLFLOW_RUN_NOTE, self.describe(study)))
        self.store.client.log_batch(self.study_run_id, metrics=metrics, tags=tags)
        self.store.client.set_terminated(self.study_run_id, status=status)

    def describe(self, study: optuna.Study) -> str:
        """The study run's description (markdown): the best trial with its Λ, every trial with
        a link to its run, and the baselines."""
        trials = study.get_trials(deepcopy=False)
        best = _best_trial(study)
        best_run = None if best is None else best.user_attrs.get(TRIAL_RUN_ATTR)
        lambdas: dict[str, float] = {}
        if best_run is not None:
            try:
                metrics = self.store.client.get_run(best_run).data.metrics
                lambdas = {
                    k[len("lambda/") :]: v for k, v in metrics.items() if k.startswith("lambda/")
                }
            except Exception:  # the description is best effort: the study goes on
                lambdas = {}
        rows = [_row(t) for t in trials]
        images = []
        if best_run is not None:
            images = [("Λ of the best trial", artifact_url(best_run, "lambda_trajectory.png"))]
        return study_note(
            self.study_name,
            self.store.experiment_id,
            rows,
            None if best is None else _row(best),
            lambdas,
            self._baseline_rows(study),
            images=images,
        )

    def _baseline_rows(self, study: optuna.Study) -> list[tuple[str, dict[str, Any], str | None]]:
        found = []
        for key, value in sorted(study.user_attrs.items()):
            if key.startswith(BASELINE_RESULT) and isinstance(value, dict):
                method = key[len(BASELINE_RESULT) :].split(" ", 1)[0]
                found.append((method, value, self._baseline_runs.get(key)))
        return found

    def log_baselines(self, study: optuna.Study) -> None:
        """Each baseline result of the study (STL, EW, … at the best trial's budget) as an MLflow
        run under the study's run (once per result), and the description rewritten with them.
        Best effort: the results are in the Optuna study whatever the store does."""
        if self.study_run_id is None:
            return
        with self._best_effort("logging the baselines"):
            self._log_baselines(study)

    @contextlib.contextmanager
    def _best_effort(self, what: str) -> Iterator[None]:
        """A store failure while ``what`` is one warning line; the study's outcome stands."""
        try:
            yield
        except Exception as error:
            logger.warning(
                "fm-optuna: MLflow tracking to %s failed while %s (%s); the study's results "
                "are in its Optuna storage",
                self.store.display_uri,
                what,
                self.store.error_line(error),
            )

    def _log_baselines(self, study: optuna.Study) -> None:
        client = self.store.client
        existing = {
            run.data.tags.get(BASELINE_TAG): run.info.run_id
            for run in client.search_runs(
                [self.store.experiment_id],
                f"tags.`mlflow.parentRunId` = '{self.study_run_id}' and "
                "tags.`fm_optuna.role` = 'baseline'",
            )
        }
        for key, value in sorted(study.user_attrs.items()):
            if not key.startswith(BASELINE_RESULT) or not isinstance(value, dict):
                continue
            method = key[len(BASELINE_RESULT) :].split(" ", 1)[0]
            fingerprint = hashlib.sha1(key.encode()).hexdigest()[:12]
            if fingerprint in existing:
                self._baseline_runs[key] = existing[fingerprint]
                continue
            run_id = client.create_run(
                self.store.experiment_id,
                run_name=f"{method}-best-budget",
                tags={
                    MLFLOW_PARENT_RUN_ID: self.study_run_id,
                    "fm_optuna.role": "baseline",
                    "method": method,
                    "optuna.study": self.study_name,
                    BASELINE_TAG: fingerprint,
                    "fm_optuna.budget": key[len(BASELINE_RESULT) + len(method) + 1 :][:5000],
                    MLFLOW_RUN_NOTE: f"Baseline `{method}` of study `{self.study_name}`, trained "
                    "once with the best trial's budget (steps, learning rate, seed).",
                    **owner_tags(),
                },
            ).info.run_id
            stamp = _now_ms()
            metrics = [
                Metric(name, float(value[field]), stamp, 0)
                for name, field in (
                    ("final/target_val", "val"),
                    ("final/target_test", "test"),
                    ("final/seconds", "seconds"),
                )
                if isinstance(value.get(field), int | float) and math.isfinite(value[field])
            ]
            client.log_batch(run_id, metrics=metrics)
            client.set_terminated(run_id, status="FINISHED")
            self._baseline_runs[key] = run_id
        client.set_tag(self.study_run_id, MLFLOW_RUN_NOTE, self.describe(study))

    def run_link(self, run_id: str) -> str:
        """Markdown naming a trial's MLflow run: a link on a server, else how to open it."""
        uri = self.store.uri
        if is_server(uri):
            from fm_optuna.tracking.ui import run_link

            url = run_link(mask_uri(uri).rstrip("/"), self.store.experiment_id, run_id, start=False)
            return f"[{run_id}]({url})"
        return f"`{run_id}` (browse: `{browse_command(uri, self.store.experiment_name)}`)"

    def browse(self) -> list[str]:
        command = browse_command(self.store.uri, self.store.experiment_name)
        lines = [
            f"MLflow experiment {self.store.experiment_name!r} in {self.store.display_uri}: "
            f"{command}"
        ]
        if self.study_run_id is not None:
            lines.append(
                f"MLflow study run study-{self.study_name} ({self.study_run_id}): its overview "
                "holds the trial table with a link to every trial's ForkMerge run"
            )
        if self.best_run_id is not None:
            lines.append(f"MLflow run of the best complete trial: {self.best_run_id}")
        return lines
