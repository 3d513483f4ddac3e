"""Two workers share one PostgreSQL-backed study; one is SIGKILLed mid-trial.

Needs a PostgreSQL server on loopback: `.ci/run` starts one (`.ci/postgres.sh`) and exports
FM_OPTUNA_TEST_POSTGRES_URL. Without it the test is skipped with that reason.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from tests.integration.test_tracking import tracking_database

ROOT = Path(__file__).resolve().parents[2]
URL = os.environ.get("FM_OPTUNA_TEST_POSTGRES_URL")
N_TRIALS = 5

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.skipif(
        URL is None, reason="FM_OPTUNA_TEST_POSTGRES_URL is not set (.ci/run sets it)"
    ),
]

SPEC = """
[study]
name = "{name}"
n_trials = {n_trials}
seed = 0
sampler = "random"
pruner = "none"
storage = "{url}"
heartbeat_seconds = 1
checkpoint_dir = "{checkpoints}"
[problem]
benchmark = "digits"
[training]
steps = 240
dt = 20
ranking = "given"
[search]
strategy = "tpe"
merge_trials = 4
[space]
dt = {{ low = 10, high = 30 }}
branches = {{ low = 2, high = 3 }}
"""

WORKER = """
import sys
sys.path.insert(0, {root!r})
from fm_optuna.study._spec import load_spec
from fm_optuna.study._tuner import Tuner
from fm_optuna.tracking import StudyTracking, open_store
from tests.conftest import ToyProblem

def tracking(problem):
    store = open_store({mlflow!r}, experiment={name!r})
    return StudyTracking(store, {name!r}, higher_is_better=False)

Tuner(load_spec({spec!r}), problem=ToyProblem(), tracking=tracking).run()
"""


READ_RUNS = """
import json, sys
from fm_optuna.tracking import open_store
store = open_store(sys.argv[1], experiment=sys.argv[2])
runs = {{}}
for run in store.client.search_runs([store.experiment_id]):  # every run, branches included
    runs[run.info.run_id] = [run.data.tags, run.info.status]
print(json.dumps(runs))
"""


def mlflow_runs(uri: str, experiment: str, run_ids: list[str]) -> dict[str, list[object]]:
    result = subprocess.run(
        [sys.executable, "-c", READ_RUNS.format(), uri, experiment, *run_ids],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(result.stdout)


def start_worker(script: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as output:  # the child keeps its own descriptor
        return subprocess.Popen(
            [sys.executable, str(script)], cwd=ROOT, stdout=output, stderr=subprocess.STDOUT
        )


@pytest.fixture
def storage() -> Iterator[optuna.storages.RDBStorage]:
    """One engine for all polling, disposed even when the test fails (no leaked connections)."""
    assert URL is not None
    rdb = optuna.storages.RDBStorage(URL)
    yield rdb
    rdb.engine.dispose()


def test_two_workers_share_the_study_and_a_killed_trial_is_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, storage: optuna.storages.RDBStorage
) -> None:
    assert URL is not None
    name = f"many-workers-{uuid.uuid4().hex[:8]}"
    mlflow_uri = tracking_database(URL)  # MLflow in its own database on the same server
    monkeypatch.setenv("FM_OPTUNA_ARTIFACT_ROOT", str(tmp_path / "artifacts"))
    spec = tmp_path / "spec.toml"
    spec.write_text(
        SPEC.format(name=name, n_trials=N_TRIALS, url=URL, checkpoints=tmp_path / "ckpt")
    )
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(root=str(ROOT), spec=str(spec), mlflow=mlflow_uri, name=name))
    victim = start_worker(script, tmp_path / "victim.log")
    survivor = start_worker(script, tmp_path / "survivor.log")
    try:
        # Wait until the victim is in the middle of a trial: RUNNING, past its first merge.
        deadline = time.monotonic() + 300
        killed_number = None
        while killed_number is None and time.monotonic() < deadline:
            time.sleep(0.2)
            try:
                study = optuna.load_study(study_name=name, storage=storage)
            except KeyError:
                continue
            for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                if (
                    trial.user_attrs.get("worker", "").endswith(f":{victim.pid}")
                    and trial.intermediate_values
                ):
                    killed_number = trial.number
        assert killed_number is not None, "the victim never reached the middle of a trial"
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=30)
        assert survivor.wait(timeout=300) == 0, (tmp_path / "survivor.log").read_text()[-3000:]
    finally:
        for process in (victim, survivor):
            if process.poll() is None:
                process.kill()

    trials = optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    # The study reaches its total; two workers may each start a last trial (at most one extra).
    assert N_TRIALS <= len(finished) <= N_TRIALS + 1
    killed = trials[killed_number]
    assert killed.state == TrialState.FAIL
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed_number]
    assert len(retries) == 1, "the killed trial is retried exactly once"
    retry = retries[0]
    assert retry.params == killed.params and retry.state == TrialState.COMPLETE
    assert retry.user_attrs["resumed_from_round"] >= 1  # resumed from the dead trial's checkpoint
    assert retry.user_attrs["worker"].endswith(f":{survivor.pid}")
    # Nothing duplicated or lost: one FAIL (the killed one), every other trial finished.
    assert [t.number for t in trials if t.state == TrialState.FAIL] == [killed_number]
    assert all(t.state != TrialState.RUNNING for t in trials)
    assert len({t.number for t in trials}) == len(trials)
    # No configuration proposed twice (42 points in the space, far from exhausted).
    configurations = [tuple(sorted(t.params.items())) for t in finished]
    assert len(set(configurations)) == len(configurations), configurations

    # The MLflow runs match the trials: one run per trial under the study's run, same state.
    # Read in a child process: MLflow's engine would leave pooled connections to this one.
    study_run = optuna.load_study(study_name=name, storage=storage).user_attrs[
        "mlflow_study_run_id"
    ]
    run_ids = [t.user_attrs["mlflow_run_id"] for t in trials]
    assert len(set(run_ids)) == len(trials)
    runs = mlflow_runs(mlflow_uri, name, run_ids)
    expected_status = {
        TrialState.COMPLETE: "FINISHED",
        TrialState.PRUNED: "KILLED",
        TrialState.FAIL: "FAILED",
    }
    # Nothing left RUNNING: not the study's run, not the killed trial's branch runs.
    assert {status for _, status in runs.values()} <= {"FINISHED", "FAILED", "KILLED"}
    study_runs = [tags for tags, _ in runs.values() if tags.get("fm_optuna.role") == "study"]
    assert len(study_runs) == 1, "the start-up race left one study run"
    for trial, run_id in zip(trials, run_ids, strict=True):
        tags, status = runs[run_id]
        assert tags["optuna.trial"] == str(trial.number)
        assert tags["mlflow.parentRunId"] == study_run
        assert status == expected_status[trial.state], trial.number
