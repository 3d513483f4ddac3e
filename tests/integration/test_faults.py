"""Faults and bad stores: one line and nothing written; killed runs end and resume whole."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fm_optuna.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def python(code: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_mlflow_log_lines_never_reach_the_terminal(tmp_path: Path) -> None:
    """A brand-new store makes MLflow announce its table creation; the user sees none of it."""
    result = python(
        "import logging\n"
        "from fm_optuna.tracking import open_store\n"
        "open_store('sqlite:///new/mlflow.db', experiment='x')\n"
        "logging.getLogger('mlflow.store.db.utils').error('a traceback from MLflow')\n",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stderr == "" and (tmp_path / "new" / "mlflow.db").exists()


def test_a_store_that_cannot_be_written_is_one_line_at_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from fm_optuna.tracking import open_store

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    open_store(uri, experiment="x")  # exists and is readable

    def refuse(*args: object, **kwargs: object) -> None:
        raise MlflowException("(sqlite3.OperationalError) attempt to write a readonly database")

    monkeypatch.setattr(MlflowClient, "set_experiment_tag", refuse)
    with pytest.raises(ConfigError) as error:
        open_store(uri, experiment="x")
    message = str(error.value)
    assert "cannot be written" in message and "readonly" in message and "\n" not in message


def test_an_unwritable_sqlite_folder_is_one_line_and_creates_nothing(tmp_path: Path) -> None:
    from fm_optuna.study._storages import check_database

    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="cannot write in the folder"):
        check_database(f"sqlite:///{blocker}/sub/x.db", parameter="storage", what="a store")
    check_database(f"sqlite:///{tmp_path}/a/b/x.db", parameter="storage", what="a store")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


SPEC = """
[study]
name = "faults"
n_trials = 1
[problem]
benchmark = "digits"
[training]
steps = 20
dt = 10
"""


def test_tune_with_an_unreachable_storage_creates_no_tracking_store(tmp_path: Path) -> None:
    (tmp_path / "spec.toml").write_text(SPEC)
    result = subprocess.run(
        [
            *(sys.executable, "-m", "fm_optuna.cli", "tune", "spec.toml"),
            *("--storage", "postgresql://fm:s3cret@127.0.0.1:1/none"),
            *("--tracking-uri", "sqlite:///tracking/mlflow.db"),
        ],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Parameter `storage`" in result.stderr and "s3cret" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.toml"]  # no tracking/mlflow.db


KILLED_RUN = """
import os, signal, sys
from fm_optuna import cli
from fm_optuna.core._checkpoints import Checkpointer

save = Checkpointer.on_merge_completed

def save_then_die(self, event):
    save(self, event)
    if event.round == 2:
        os.kill(os.getpid(), signal.SIGKILL)

Checkpointer.on_merge_completed = save_then_die
sys.exit(cli.main(sys.argv[1:]))
"""

READ_RUNS = """
import json, sys
from fm_optuna.tracking import open_store
store = open_store(sys.argv[1], experiment=sys.argv[2])
runs = store.client.search_runs([store.experiment_id])
out = {"status": {r.info.run_id: r.info.status for r in runs}}
(fm,) = [r for r in runs if r.data.tags.get("method") == "forkmerge"
         and r.data.tags.get("fm_optuna.resumed_from_round")]
out["resumed_from"] = fm.data.tags["fm_optuna.resumed_from_round"]
out["lambda"] = {
    key.split("/", 1)[1]: [(m.step, m.value) for m in sorted(
        store.client.get_metric_history(fm.info.run_id, key), key=lambda m: m.step)]
    for key in fm.data.metrics if key.startswith("lambda/")
}
path = store.client.download_artifacts(fm.info.run_id, "lambda_trajectory.csv", sys.argv[3])
out["csv"] = open(path).read()
print(json.dumps(out))
"""


@pytest.mark.slow
def test_a_killed_run_resumed_holds_the_whole_lambda_trajectory(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["run", "--methods", "forkmerge", "--dt", "10", "--steps", "40", "--branches", "2"]
    args += ["--merge-trials", "3", "--checkpoint", "run.ckpt", "--tracking-uri", uri]
    args += ["--experiment", "faults", "--json"]
    killed = python(KILLED_RUN, *args, cwd=tmp_path)
    assert killed.returncode == -9, killed.stderr[-2000:]

    resumed = python("from fm_optuna import cli; cli.main()", *args, "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    payload = json.loads(resumed.stdout)["forkmerge"]
    assert payload["resumed"]["after_round"] == 2 and payload["resumed"]["at_step"] == 20
    assert payload["resumed"]["seconds_before"] > 0
    lambdas = [m["lambda"] for m in payload["merges"]]
    assert len(lambdas) == 4

    read = python(READ_RUNS, uri, "faults", str(tmp_path), cwd=tmp_path)
    assert read.returncode == 0, read.stderr[-2000:]
    runs = json.loads(read.stdout)
    # The killed invocation's runs were ended by the resume; nothing is left RUNNING.
    assert "RUNNING" not in runs["status"].values() and "KILLED" in runs["status"].values()
    assert runs["resumed_from"] == "2"
    series = list(runs["lambda"].values())
    assert [step for step, _ in series[0]] == [10, 20, 30, 40]  # rounds 1-2 restored
    for i, weights in enumerate(lambdas):  # the metric keys come in no particular order
        assert sorted(s[i][1] for s in series) == pytest.approx(sorted(weights))
    rows = list(csv.reader(io.StringIO(runs["csv"])))
    assert len(rows) == 1 + 4


def test_a_concurrent_probe_of_the_same_tag_is_retried_not_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two workers probing a new experiment insert the same tag; the loser's unique-key
    conflict is the other worker's write, not a store that cannot be written."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from fm_optuna.tracking import open_store

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    open_store(uri, experiment="x")
    real = MlflowClient.set_experiment_tag
    calls: list[str] = []

    def conflict_once(self: MlflowClient, *args: object, **kwargs: object) -> None:
        calls.append("call")
        if len(calls) == 1:
            raise MlflowException(
                "(psycopg.errors.UniqueViolation) duplicate key value violates unique "
                'constraint "experiment_tag_pk"'
            )
        real(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(MlflowClient, "set_experiment_tag", conflict_once)
    store = open_store(uri, experiment="x")
    assert len(calls) == 2
    tags = store.client.get_experiment(store.experiment_id).tags
    assert "fm_optuna.last_opened" in tags
