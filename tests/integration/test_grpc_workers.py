"""Two real `fm-optuna tune` workers through `grpc://` (PostgreSQL behind the proxy); one is
SIGKILLed mid-trial, the other fails that trial on its heartbeat and retries it.

Needs PostgreSQL on loopback (FM_OPTUNA_TEST_POSTGRES_URL, set by .ci/run); skipped without it.
The in-process version (one process, a trial asked and abandoned) is in tests/study/test_grpc.py.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from fm_optuna.experiments._bench_cluster import Service, free_port, start_proxy

ROOT = Path(__file__).resolve().parents[2]
URL = os.environ.get("FM_OPTUNA_TEST_POSTGRES_URL")
N_TRIALS = 4

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.slow,
    pytest.mark.skipif(
        URL is None, reason="FM_OPTUNA_TEST_POSTGRES_URL is not set (.ci/run sets it)"
    ),
]

# Trials of a few seconds with several merges each (a checkpoint and a report at every one).
SPEC = """
[study]
name = "{name}"
n_trials = {n_trials}
seed = 0
sampler = "random"
pruner = "none"
heartbeat_seconds = 1
checkpoint_dir = "{checkpoints}"
[problem]
benchmark = "examples.diabetes:build"
target = "progression"
[training]
steps = 120
[search]
strategy = "greedy"
[space]
dt = {{ low = 15, high = 30 }}
branches = {{ low = 2, high = 3 }}
lr = {{ low = 0.001, high = 0.1, log = true }}
"""


@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[str]:
    assert URL is not None
    port = free_port()
    service = start_proxy(URL, port, tmp_path / "proxy.log", threads=4)
    try:
        yield f"grpc://127.0.0.1:{port}"
    finally:
        service.stop()


@pytest.fixture
def storage() -> Iterator[optuna.storages.RDBStorage]:
    """The test's own look at the database (one engine, disposed even when the test fails)."""
    assert URL is not None
    rdb = optuna.storages.RDBStorage(URL)
    yield rdb
    rdb.engine.dispose()


def worker(spec: Path, grpc: str, log: Path) -> Service:
    command = [sys.executable, "-m", "fm_optuna.cli", "tune", str(spec), "--storage", grpc]
    # The spec's factory, examples.diabetes:build, is found from the repository.
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    return Service([*command, "--no-tracking", "--threads", "1"], log, env).start()


def test_a_killed_workers_trial_is_failed_on_its_heartbeat_and_retried(
    tmp_path: Path, proxy: str, storage: optuna.storages.RDBStorage
) -> None:
    name = f"grpc-workers-{uuid.uuid4().hex[:8]}"
    spec = tmp_path / "spec.toml"
    spec.write_text(SPEC.format(name=name, n_trials=N_TRIALS, checkpoints=tmp_path / "ckpt"))
    victim = worker(spec, proxy, tmp_path / "victim.log")
    survivor = worker(spec, proxy, tmp_path / "survivor.log")
    assert victim.process is not None and survivor.process is not None
    try:
        # Wait until the victim is in the middle of a trial: RUNNING, past its first merge.
        deadline, killed_number = time.monotonic() + 120, None
        while killed_number is None and time.monotonic() < deadline:
            time.sleep(0.2)
            try:
                study = optuna.load_study(study_name=name, storage=storage)
            except KeyError:
                continue
            for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                mine = trial.user_attrs.get("worker", "").endswith(f":{victim.process.pid}")
                if mine and trial.intermediate_values:
                    killed_number = trial.number
        assert killed_number is not None, (tmp_path / "victim.log").read_text()[-3000:]
        victim.kill()
        assert survivor.process.wait(timeout=120) == 0, (tmp_path / "survivor.log").read_text()
    finally:
        victim.kill()
        survivor.kill()

    trials = optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert N_TRIALS <= len(complete) <= N_TRIALS + 1  # + the victim's last, had it finished one
    killed = trials[killed_number]
    assert killed.state == TrialState.FAIL
    reason = killed.user_attrs["fail_reason"]
    assert f"its worker {killed.user_attrs['worker']} sent no heartbeat" in reason
    assert f":{survivor.process.pid}" in reason  # who noticed
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed_number]
    assert len(retries) == 1, "the killed trial is retried exactly once"
    (retry,) = retries
    assert retry.params == killed.params and retry.state == TrialState.COMPLETE
    assert retry.user_attrs["worker"].endswith(f":{survivor.process.pid}")
    assert retry.user_attrs["resumed_from_round"] >= 1  # from the killed trial's checkpoint
    assert "fail_reason" not in retry.user_attrs
    assert [t.number for t in trials if t.state == TrialState.FAIL] == [killed_number]
    assert all(t.state != TrialState.RUNNING for t in trials)
    survivor_log = (tmp_path / "survivor.log").read_text()
    assert "Traceback" not in survivor_log, survivor_log[-3000:]
