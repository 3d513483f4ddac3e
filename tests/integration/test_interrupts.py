"""SIGTERM and SIGINT (issue 18, items 1 and 2): real signals to real `tune` and `run` processes.

A signal is one line and exit 128 + signal; the trial ends FAIL with its reason and is retried by
the next invocation with the same parameters from its checkpoint; MLflow runs end KILLED.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

ROOT = Path(__file__).resolve().parents[2]

SPEC = """
[study]
name = "sig"
n_trials = 2
seed = 0
storage = "sqlite:///{root}/optuna.db"
checkpoint_dir = "{root}/checkpoints"
pruner = "none"
[problem]
benchmark = "examples.diabetes:build"
[training]
steps = {steps}
dt = 50
ranking = "given"
[search]
strategy = "random"
merge_trials = 3
[space]
dt = {{ low = 40, high = 60 }}
"""


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}


def start(*args: str, cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "fm_optuna.cli", *args],
        cwd=cwd,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def fm(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fm_optuna.cli", *args],
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )


def signal_once_written(
    process: subprocess.Popen[str],
    files: Path,
    pattern: str,
    signum: int,
    *,
    after: float = 0.0,
) -> tuple[int, str, str]:
    """Send ``signum`` once a file matching ``pattern`` exists under ``files`` (a merge was
    checkpointed), written after ``after`` (a time stamp); the process's exit code and output."""
    deadline = time.monotonic() + 300
    while not [p for p in files.glob(pattern) if p.stat().st_mtime > after]:
        if process.poll() is not None or time.monotonic() > deadline:
            out, err = process.communicate()
            pytest.fail(f"no checkpoint before the process ended ({process.returncode}): {err}")
        time.sleep(0.05)
    process.send_signal(signum)
    out, err = process.communicate(timeout=300)
    return process.returncode, out, err


def mlflow_runs(uri: str, experiment: str) -> list[object]:
    import warnings

    from mlflow import MlflowClient

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The ``noload`` loader strategy")
        client = MlflowClient(tracking_uri=uri)
        found = client.get_experiment_by_name(experiment)
        return client.search_runs([found.experiment_id])


def last_line(err: str) -> str:
    return err.strip().splitlines()[-1]


def test_sigterm_on_tune_fails_the_trial_retryably_and_the_next_tune_resumes_it(
    tmp_path: Path,
) -> None:
    spec = tmp_path / "sig.toml"
    spec.write_text(SPEC.format(root=tmp_path, steps=4000))
    mlflow = f"sqlite:///{tmp_path}/mlflow.db"
    process = start("tune", str(spec), "--tracking-uri", mlflow, cwd=tmp_path)
    code, _, err = signal_once_written(
        process, tmp_path / "checkpoints" / "sig", "trial_0.ckpt", signal.SIGTERM
    )
    assert code == 143, err
    assert "Traceback" not in err
    assert last_line(err).startswith(
        "fm-optuna tune: interrupted by SIGTERM; trial 0 will be retried from merge "
    )

    study = optuna.load_study(study_name="sig", storage=f"sqlite:///{tmp_path}/optuna.db")
    first, retry = study.get_trials(deepcopy=False)
    assert first.state == TrialState.FAIL
    assert first.user_attrs["fail_reason"] == "interrupted by SIGTERM"
    assert retry.state == TrialState.WAITING and retry.params == first.params
    assert "fail_reason" not in retry.user_attrs

    runs = mlflow_runs(mlflow, "fm-optuna/study/sig")
    assert runs and all(run.info.status == "KILLED" for run in runs), [
        (run.info.run_name, run.info.status) for run in runs
    ]

    # The next invocation runs the retry first, from the interrupted trial's checkpoint.
    again = fm("tune", str(spec), "--no-tracking", "--n-trials", "1", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    study = optuna.load_study(study_name="sig", storage=f"sqlite:///{tmp_path}/optuna.db")
    retried = study.trials[1]
    assert retried.state == TrialState.COMPLETE
    assert retried.params == first.params
    assert retried.user_attrs["resumed_from_round"] >= 1
    # Finished: its merge checkpoint is removed (keep_checkpoints = false), its model kept.
    assert not (tmp_path / "checkpoints" / "sig" / "trial_0.ckpt").exists()
    assert Path(retried.user_attrs["final_model"]).exists()


def test_ctrl_c_on_run_is_one_line_exit_130_and_resume_continues(tmp_path: Path) -> None:
    checkpoint = tmp_path / "fm.ckpt"
    args = [
        "run",
        "--benchmark",
        "examples.diabetes:build",
        "--methods",
        "forkmerge",
        "--steps",
        "4000",
        "--dt",
        "50",
        "--merge-trials",
        "3",
        "--no-tracking",
        "--checkpoint",
        str(checkpoint),
    ]
    process = start(*args, cwd=tmp_path)
    code, _, err = signal_once_written(process, tmp_path, "fm.ckpt", signal.SIGINT)
    assert code == 130, err
    assert "Traceback" not in err
    assert "fm-optuna run: interrupted by SIGINT; rerun with --resume" in last_line(err)
    assert checkpoint.exists()
    # The lock of the interrupted run is released: the resume is allowed.
    before = checkpoint.stat().st_mtime
    process = start(*args, "--resume", "--json", cwd=tmp_path)
    code, _, err = signal_once_written(process, tmp_path, "fm.ckpt", signal.SIGTERM, after=before)
    assert code == 143 and "Traceback" not in err
    assert "interrupted by SIGTERM" in last_line(err)


def test_sigterm_on_run_ends_its_mlflow_runs_killed(tmp_path: Path) -> None:
    mlflow = f"sqlite:///{tmp_path}/mlflow.db"
    process = start(
        "run",
        "--benchmark",
        "examples.diabetes:build",
        "--methods",
        "forkmerge",
        "--steps",
        "4000",
        "--dt",
        "50",
        "--merge-trials",
        "3",
        "--tracking-uri",
        mlflow,
        "--checkpoint",
        str(tmp_path / "fm.ckpt"),
        cwd=tmp_path,
    )
    code, _, err = signal_once_written(process, tmp_path, "fm.ckpt", signal.SIGTERM)
    assert code == 143 and "Traceback" not in err, err
    runs = mlflow_runs(mlflow, "fm-optuna/diabetes-progression")
    assert runs and {run.info.status for run in runs} == {"KILLED"}


KILLED_MID_ROUND = """
import sys
from examples.diabetes import build
from fm_optuna.config import ForkMergeConfig
from fm_optuna.core._events import EventStream, Observer
from fm_optuna.core._loop import run_forkmerge
from fm_optuna.tracking import MlflowTracker, open_store


class Merged(Observer):
    # After the tracker: the line says the tracker's hook for this merge has returned.
    def on_merge_completed(self, event):
        print(f"merged {event.round} {event.step}", flush=True)


store = open_store(sys.argv[1], experiment="killed")
tracker = MlflowTracker(store)
config = ForkMergeConfig(
    dt=50, total_steps=100000, strategy="random", merge_trials=3, ranking="given", log_every=10
)
run_forkmerge(build(), config, EventStream([tracker, Merged()]))
"""


def test_sigkill_mid_round_finds_every_event_up_to_the_last_merge_in_mlflow(
    tmp_path: Path,
) -> None:
    """No `finally` runs on SIGKILL: what MLflow holds is what was written before the next round
    began. Every merge the process announced (after the tracker's hook) must be there whole."""
    from mlflow import MlflowClient

    script = tmp_path / "killed.py"
    script.write_text(KILLED_MID_ROUND)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    process = subprocess.Popen(
        [sys.executable, str(script), uri],
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    announced = []
    for line in process.stdout:  # blocks until the next line: no clock involved
        announced.append(tuple(int(n) for n in line.split()[1:]))
        if len(announced) == 2:
            process.kill()  # in round 3 (or later: then it printed more, read below)
            break
    rest, err = process.communicate(timeout=300)
    announced += [tuple(int(n) for n in line.split()[1:]) for line in rest.splitlines()]
    assert process.returncode == -signal.SIGKILL, err
    last_round, last_step = announced[-1]

    runs = mlflow_runs(uri, "killed")
    (top,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert top.info.status == "RUNNING"  # nobody could end it: the next invocation will
    client = MlflowClient(tracking_uri=uri)
    rounds = client.get_metric_history(top.info.run_id, "merge/round")
    assert sorted(int(m.value) for m in rounds)[:last_round] == list(range(1, last_round + 1))
    merges = {f.path for f in client.list_artifacts(top.info.run_id, "merges")}
    assert {f"merges/round_{r:03d}.json" for r in range(1, last_round + 1)} <= merges
    note = top.data.tags["mlflow.note.content"]
    assert f"| {last_round} | {last_step} |" in note
    for child in children:  # every branch's losses and scores up to that merge
        scores = client.get_metric_history(child.info.run_id, "val/score")
        assert {50 * r for r in range(1, last_round + 1)} <= {m.step for m in scores}
        losses = [
            m.step
            for key in child.data.metrics
            if key.startswith("train/loss/")
            for m in client.get_metric_history(child.info.run_id, key)
        ]
        assert set(range(10, last_step + 1, 10)) <= set(losses)
