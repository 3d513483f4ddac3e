"""Two workers share one PostgreSQL-backed study; one is SIGKILLed mid-trial.

Needs a PostgreSQL server on loopback: `.ci/run` starts one (`.ci/postgres.sh`) and exports
FM_OPTUNA_TEST_POSTGRES_URL. Without it the test is skipped with that reason.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

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
from fm_optuna.spec import load_spec
from fm_optuna.study import Tuner
from tests.conftest import ToyProblem
Tuner(load_spec({spec!r}), problem=ToyProblem()).run()
"""


def start_worker(script: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as output:  # the child keeps its own descriptor
        return subprocess.Popen(
            [sys.executable, str(script)], cwd=ROOT, stdout=output, stderr=subprocess.STDOUT
        )


def test_two_workers_share_the_study_and_a_killed_trial_is_retried(tmp_path: Path) -> None:
    name = f"many-workers-{uuid.uuid4().hex[:8]}"
    spec = tmp_path / "spec.toml"
    spec.write_text(
        SPEC.format(name=name, n_trials=N_TRIALS, url=URL, checkpoints=tmp_path / "ckpt")
    )
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(root=str(ROOT), spec=str(spec)))
    storage = optuna.storages.RDBStorage(URL)  # one engine for all polling, disposed at the end
    victim = start_worker(script, tmp_path / "victim.log")
    survivor = start_worker(script, tmp_path / "survivor.log")
    try:
        # Wait until the victim is in the middle of a trial: RUNNING, past its first merge.
        deadline = time.monotonic() + 180
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
    storage.engine.dispose()
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
