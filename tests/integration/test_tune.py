"""The outer study on SQLite with the toy problem: runs, resumes, prunes, retries a dead worker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState, create_trial

from fm_optuna.core._loop import run_forkmerge
from fm_optuna.errors import ConfigError
from fm_optuna.study._spec import load_spec
from fm_optuna.study._tuner import MedianPruner, Tuner, mask_password
from tests.conftest import ToyProblem

ROOT = Path(__file__).resolve().parents[2]

SPEC = """
[study]
name = "toy"
n_trials = {n_trials}
seed = 0
storage = "sqlite:///{storage}"
heartbeat_seconds = 1
checkpoint_dir = "{checkpoints}"
pruner = "{pruner}"
[problem]
benchmark = "digits"
[training]
steps = 60
dt = 20
branches = 3
ranking = "given"
[search]
strategy = "tpe"
merge_trials = 4
[space]
dt = {{ low = 10, high = 30 }}
branches = {{ low = 2, high = 3 }}
"""


def spec_file(tmp_path: Path, *, n_trials: int = 3, pruner: str = "none") -> Path:
    path = tmp_path / "toy.toml"
    path.write_text(
        SPEC.format(
            n_trials=n_trials,
            storage=tmp_path / "optuna.db",
            checkpoints=tmp_path / "checkpoints",
            pruner=pruner,
        )
    )
    return path


def tuner(path: Path, **kwargs: object) -> Tuner:
    return Tuner(load_spec(path), problem=ToyProblem(), **kwargs)


def test_tune_runs_the_requested_trials_and_resumes_up_to_a_new_total(tmp_path: Path) -> None:
    path = spec_file(tmp_path)
    report = tuner(path).run()
    assert [t.state for t in report.trials] == ["COMPLETE"] * 3
    assert set(report.best_params) == {"dt", "branches"}
    assert report.best_test is not None and "mse" in report.best_test
    assert Path(report.best_model).exists()

    again = tuner(path).run()  # same total: nothing new
    assert len(again.trials) == 3
    more = tuner(path, n_trials=5).run()  # a larger total adds trials, keeps the old ones
    assert len(more.trials) == 5
    assert [t.params for t in more.trials[:3]] == [t.params for t in report.trials]


def test_each_trial_reports_every_merge(tmp_path: Path) -> None:
    tuner(spec_file(tmp_path, n_trials=2)).run()
    study = optuna.load_study(study_name="toy", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    for trial in study.trials:
        steps = sorted(trial.intermediate_values)
        dt = trial.params["dt"]
        assert steps == [min(dt * k, 60) for k in range(1, len(steps) + 1)] and steps[-1] == 60
        assert trial.value == pytest.approx(trial.intermediate_values[60])


def test_median_pruner_compares_at_aligned_training_progress() -> None:
    study = optuna.create_study(direction="maximize")
    for values in ({50: 1.0, 100: 2.0}, {40: 0.5, 80: 1.5, 120: 2.5}):
        study.add_trial(
            create_trial(
                value=max(values.values()), intermediate_values=values, params={}, distributions={}
            )
        )
    pruner = MedianPruner(n_startup_trials=2)
    low = create_trial(
        state=TrialState.RUNNING, intermediate_values={90: 1.0}, params={}, distributions={}
    )
    high = create_trial(
        state=TrialState.RUNNING, intermediate_values={90: 1.9}, params={}, distributions={}
    )
    # At step 90 the others' last values at or before it are 1.0 (step 50) and 1.5 (step 80).
    assert pruner.prune(study, low) is True  # 1.0 < median(1.0, 1.5) = 1.25
    assert pruner.prune(study, high) is False


def test_bad_storage_is_one_clear_error_with_the_password_masked(tmp_path: Path) -> None:
    path = spec_file(tmp_path)
    with pytest.raises(ConfigError) as error:
        tuner(path, storage="postgresql://fm:s3cret@127.0.0.1:1/none")
    assert "Parameter `storage`" in str(error.value) and "s3cret" not in str(error.value)
    assert mask_password("postgresql://fm:s3cret@h/db") == "postgresql://fm:***@h/db"


WORKER = """
import os, signal, sys
sys.path.insert(0, {root!r})
from fm_optuna.core._events import Observer
from fm_optuna.study._spec import load_spec
from fm_optuna.study._tuner import Tuner
from tests.conftest import ToyProblem

class Die(Observer):
    def on_merge_completed(self, event):
        if event.round == 2:
            os.kill(os.getpid(), signal.SIGKILL)  # after the checkpoint of round 2 is written

def tracking(problem):
    from fm_optuna.tracking import StudyTracking, open_store
    store = open_store({mlflow!r}, experiment="fm-optuna/study/toy")
    return StudyTracking(store, "toy", higher_is_better=False)

Tuner(
    load_spec({spec!r}),
    problem=ToyProblem(),
    observers=lambda trial, config: [Die()],
    tracking=tracking,
).run()
"""


def finished_params(storage: str, name: str = "toy") -> list[tuple[object, ...]]:
    trials = optuna.load_study(study_name=name, storage=storage).trials
    done = (TrialState.COMPLETE, TrialState.PRUNED)
    return [tuple(sorted(t.params.items())) for t in trials if t.state in done]


def test_a_seeded_single_worker_study_is_reproducible(tmp_path: Path) -> None:
    runs = []
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        tuner(spec_file(tmp_path / folder, n_trials=3)).run()
        runs.append(finished_params(f"sqlite:///{tmp_path / folder / 'optuna.db'}"))
    assert runs[0] == runs[1] and len(runs[0]) == 3


def test_extending_a_study_proposes_no_finished_parameters(tmp_path: Path) -> None:
    """A second invocation (a re-run after a crash, or --n-trials) used to restart the seeded
    start-up sampling and repeat trial 0's configuration as trial 3."""
    path = spec_file(tmp_path, n_trials=3)
    tuner(path).run()
    tuner(path, n_trials=6).run()
    params = finished_params(f"sqlite:///{tmp_path / 'optuna.db'}")
    assert len(params) == 6 and len(set(params)) == 6


def test_a_dead_workers_trial_fails_is_retried_and_resumes_from_its_last_merge(
    tmp_path: Path,
) -> None:
    path = spec_file(tmp_path, n_trials=2)
    spec = load_spec(path)
    script = tmp_path / "worker.py"
    mlflow = f"sqlite:///{tmp_path / 'mlflow.db'}"
    script.write_text(WORKER.format(root=str(ROOT), spec=str(path), mlflow=mlflow))
    died = subprocess.run([sys.executable, str(script)], cwd=ROOT, env={**os.environ}, timeout=300)
    assert died.returncode == -9
    time.sleep(2.5)  # > grace period (2 × heartbeat): the trial is now stale

    from fm_optuna.tracking import StudyTracking, open_store

    store = open_store(mlflow, experiment="fm-optuna/study/toy")
    report = tuner(
        path, tracking=lambda problem: StudyTracking(store, "toy", higher_is_better=False)
    ).run()
    study = optuna.load_study(study_name="toy", storage=spec.study.storage)
    states = [t.state for t in study.trials]
    assert states[0] == TrialState.FAIL
    retry = next(t for t in study.trials if t.system_attrs.get("failed_trial") == 0)
    assert retry.params == study.trials[0].params and retry.state == TrialState.COMPLETE
    assert retry.user_attrs["resumed_from_round"] == 2
    # Why it failed stays with the dead trial (the storage wrote it before failing it).
    assert "sent no heartbeat for more than 2 s" in study.trials[0].user_attrs["fail_reason"]
    assert "fail_reason" not in retry.user_attrs
    assert len([t for t in study.trials if t.state == TrialState.COMPLETE]) == 2
    assert report.best_value is not None

    # The resumed trial followed the Λ trajectory of an uninterrupted run with the same settings.
    config = spec.config(dt=retry.params["dt"], branches=retry.params["branches"])
    uninterrupted = run_forkmerge(ToyProblem(), config)
    names = [branch.name for branch in uninterrupted.branches]
    assert retry.user_attrs["lambda_history"] == [  # keyed by branch name, for optuna-dashboard
        {"step": step, **{name: round(w, 4) for name, w in zip(names, weights, strict=True)}}
        for step, weights in zip(uninterrupted.steps, uninterrupted.lambda_history, strict=True)
    ]
    json.dumps(retry.user_attrs)  # user attributes stay JSON
    params = finished_params(spec.study.storage)
    assert len(set(params)) == len(params), "a finished configuration was proposed again"

    # MLflow after the SIGKILLed worker and the re-run: no run is left RUNNING, the dead trial's
    # run and its branch runs are FAILED, and the study has one run, ended with its best.
    runs = store.client.search_runs([store.experiment_id])
    assert {run.info.status for run in runs} <= {"FINISHED", "FAILED", "KILLED"}
    dead = study.trials[0].user_attrs["mlflow_run_id"]
    branches = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == dead]
    assert branches and {r.info.status for r in branches} == {"FAILED"}
    assert store.client.get_run(dead).info.status == "FAILED"
    assert "sent no heartbeat" in store.client.get_run(dead).data.tags["fm_optuna.fail_reason"]
    (study_run,) = [r for r in runs if r.data.tags.get("fm_optuna.role") == "study"]
    assert study_run.info.status == "FINISHED"
    assert study_run.data.metrics["best/value"] == pytest.approx(report.best_value)
    assert study_run.data.metrics["best/dt"] == report.best_params["dt"]


def test_each_outer_trial_is_an_mlflow_run_under_the_study_run(tmp_path: Path) -> None:
    from fm_optuna.tracking import StudyTracking, open_store

    store = open_store(f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="fm-optuna/study/toy")
    report = tuner(
        spec_file(tmp_path, n_trials=2),
        tracking=lambda problem: StudyTracking(store, "toy", higher_is_better=False),
    ).run()
    study = optuna.load_study(study_name="toy", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    study_run = study.user_attrs["mlflow_study_run_id"]
    assert store.client.get_run(study_run).data.tags["best_trial"] == str(report.best_trial)
    for trial in study.trials:
        run = store.client.get_run(trial.user_attrs["mlflow_run_id"])
        assert run.data.tags["mlflow.parentRunId"] == study_run
        assert run.data.tags["optuna.trial"] == str(trial.number)
        assert run.data.tags["optuna.study"] == "toy"
        assert run.info.status == "FINISHED"
        history = store.client.get_metric_history(run.info.run_id, "lambda/target")
        assert len(history) == len(trial.intermediate_values)
        if trial.state == TrialState.COMPLETE:  # the keys `run` and `compare` log too
            assert {"final/target_val", "final/val/t0/mse", "final/seconds"} <= set(
                run.data.metrics
            )
            assert "Λ per merge" in run.data.tags["mlflow.note.content"]
    assert any("MLflow study run" in line for line in report.tracking["browse"])
    # The browse hint names the store, so it works from any folder.
    assert any(f"--tracking-uri {store.uri}" in line for line in report.tracking["browse"])


# --- direction and non-finite trials (issue 8) --------------------------------------------------


def test_a_lower_is_better_target_is_minimised_as_itself_with_its_name(tmp_path: Path) -> None:
    report = tuner(spec_file(tmp_path, n_trials=2)).run()  # the toy target's metric is mse
    study = optuna.load_study(study_name="toy", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert study.direction == optuna.study.StudyDirection.MINIMIZE
    assert study.metric_names == ["target_val/mse"]
    for trial in study.trials:
        assert trial.value > 0 and trial.user_attrs["val_metrics"]["mse"] == trial.value
        assert all(v > 0 for v in trial.intermediate_values.values())  # reported as mse too
    assert report.best_value == min(t.value for t in study.trials)


def test_a_study_made_with_the_old_direction_is_refused_in_one_line(tmp_path: Path) -> None:
    path = spec_file(tmp_path)
    optuna.create_study(
        study_name="toy", storage=f"sqlite:///{tmp_path / 'optuna.db'}", direction="maximize"
    )
    with pytest.raises(ConfigError, match=r"^Parameter `study.name` should name a study that "):
        tuner(path).run()


def test_median_pruner_follows_a_minimised_study() -> None:
    study = optuna.create_study(direction="minimize")
    for values in ({50: 1.0}, {50: 2.0}):
        study.add_trial(
            create_trial(value=1.0, intermediate_values=values, params={}, distributions={})
        )
    pruner = MedianPruner(n_startup_trials=2)
    worse = create_trial(
        state=TrialState.RUNNING, intermediate_values={60: 1.8}, params={}, distributions={}
    )
    better = create_trial(
        state=TrialState.RUNNING, intermediate_values={60: 1.2}, params={}, distributions={}
    )
    assert pruner.prune(study, worse) is True  # 1.8 > median 1.5 in a minimised study
    assert pruner.prune(study, better) is False


def test_a_trial_whose_loss_goes_nan_fails_with_its_reason_and_is_never_pruned(
    tmp_path: Path,
) -> None:
    from fm_optuna.tracking import StudyTracking, open_store

    store = open_store(f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="fm-optuna/study/toy")
    # The target: its first loss (drawn by the problem check) is finite, then every branch
    # goes NaN from step 1.
    problem = ToyProblem(nan_task="t0", nan_after=1)
    report = Tuner(
        load_spec(spec_file(tmp_path, n_trials=2, pruner="median")),
        problem=problem,
        tracking=lambda problem: StudyTracking(store, "toy", higher_is_better=False),
    ).run()  # a FAIL with a reason counts: the study ends after 2 trials, not never
    study = optuna.load_study(study_name="toy", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert [t.state for t in study.trials] == [TrialState.FAIL] * 2
    for trial, outcome in zip(study.trials, report.trials, strict=True):
        reason = trial.user_attrs["fail_reason"]
        assert reason.startswith("NonFiniteTraining: training loss became nan (task `t0` at step")
        assert "every branch of round 1 went non-finite" in reason and outcome.reason == reason
        run = store.client.get_run(trial.user_attrs["mlflow_run_id"])
        assert run.info.status == "FAILED"
        assert run.data.tags["fm_optuna.fail_reason"] == reason
    assert report.best_value is None


def test_tune_saves_every_trials_merge_problems_when_the_spec_asks(tmp_path: Path) -> None:
    from fm_optuna.search._merge_problem import MergeProblem, load_data
    from fm_optuna.tracking import StudyTracking, open_store

    path = spec_file(tmp_path, n_trials=2)
    path.write_text(
        path.read_text().replace("merge_trials = 4", "merge_trials = 4\nsave_merge_problems = true")
    )
    store = open_store(f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="fm-optuna/study/toy")
    tune = tuner(path, tracking=lambda problem: StudyTracking(store, "toy", higher_is_better=False))
    tune.run()
    study = optuna.load_study(study_name="toy", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    for trial in study.trials:
        saved = sorted(tune.merge_problems(trial.number).glob("*.pt"))
        assert len(saved) == len(trial.intermediate_values)  # one per merge
        data = load_data(saved[-1])
        assert data["source"]["benchmark"] == "digits"
        merge = MergeProblem.from_data(data, ToyProblem())
        weights = data["decision"]["weights"]
        assert merge.score(weights) == data["decision"]["score"]  # the same candidate score
        run_id = trial.user_attrs["mlflow_run_id"]
        logged = [a.path for a in store.client.list_artifacts(run_id, "merge_problems")]
        assert sorted(Path(p).name for p in logged) == [p.name for p in saved]


def test_median_pruner_counts_other_workers_running_trials_past_the_step() -> None:
    study = optuna.create_study(direction="maximize")
    study.add_trial(
        create_trial(value=2.0, intermediate_values={50: 2.0}, params={}, distributions={})
    )
    past = study.ask()  # another worker's trial, RUNNING and already at step 80
    study._storage.set_trial_intermediate_value(past._trial_id, 40, 1.5)
    study._storage.set_trial_intermediate_value(past._trial_id, 80, 1.9)
    behind = study.ask()  # one still at step 20: its value is one of less training
    study._storage.set_trial_intermediate_value(behind._trial_id, 20, 0.1)
    pruner = MedianPruner(n_startup_trials=2)
    low = create_trial(
        state=TrialState.RUNNING, intermediate_values={60: 1.6}, params={}, distributions={}
    )
    # At step 60 the others are 2.0 (finished) and 1.5 (running, its value at 40); median 1.75.
    assert pruner.prune(study, low) is True
    # Before the running trial passes the step, only one value is known: too few to prune.
    assert (
        MedianPruner(n_startup_trials=2).prune(
            study,
            create_trial(
                state=TrialState.RUNNING, intermediate_values={90: 1.0}, params={}, distributions={}
            ),
        )
        is False
    )


def test_a_trial_another_worker_failed_meanwhile_is_one_line_and_the_study_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker whose heartbeats came too late (a stalled machine) has its live trial failed by
    another worker; it used to die on Optuna's "Cannot tell a FAIL trial" with a traceback."""
    from fm_optuna.core._events import MergeCompleted, Observer
    from fm_optuna.study._stale import record_stale_reasons

    path = spec_file(tmp_path, n_trials=3)
    url = f"sqlite:///{tmp_path / 'optuna.db'}"

    class AnotherWorkersStaleCheck(Observer):
        def __init__(self, trial: optuna.Trial) -> None:
            self.trial = trial

        def on_merge_completed(self, event: MergeCompleted) -> None:
            if self.trial.number != 1 or event.round != 1:
                return
            other = optuna.storages.RDBStorage(url)
            try:
                record_stale_reasons(other, [self.trial._trial_id], 2.0)
                other.set_trial_state_values(self.trial._trial_id, TrialState.FAIL)
            finally:
                other.engine.dispose()

    report = tuner(path, observers=lambda trial, config: [AnotherWorkersStaleCheck(trial)]).run()
    assert [t.state for t in report.trials] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    assert "sent no heartbeat for more than 2 s" in str(report.trials[1].reason)
    lines = [r.getMessage() for r in caplog.records if r.levelno >= 30]
    said = [line for line in lines if "trial 1 was failed by another worker" in line]
    assert len(said) == 1 and "this worker goes on with the next trial" in said[0]
    assert not [r for r in caplog.records if r.exc_info], "no traceback"
