"""MLflow tracking end to end: a tiny ForkMerge on a temporary SQLite store, read back.

A fresh MLflow SQLite store costs seconds of schema migrations, so one empty store is built per
session and copied for every test that needs its own.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fm_optuna.core._events import EventStream, MergeCompleted, RunStarted
from fm_optuna.core._loop import ForkMergeConfig
from fm_optuna.errors import ConfigError
from fm_optuna.experiments._run_methods import Comparison, run_methods
from fm_optuna.search._base import MergeDecision
from fm_optuna.tracking import MlflowTracker, TrackingStore, mask_uri, metric_key, open_store
from fm_optuna.tracking.ui import free_port
from tests.conftest import ToyProblem

EXPERIMENT = "fm-optuna/toy-t0"
SECRET = "s3cr3t-pw"
PG_URI = f"postgresql://ana:{SECRET}@127.0.0.1:1/mlflow"
REPO = Path(__file__).resolve().parents[2]


def tiny_config(**overrides: Any) -> ForkMergeConfig:
    values: dict[str, Any] = dict(
        dt=10,
        total_steps=40,
        strategy="grid",
        grid_resolution=0.25,
        branches=3,
        ranking_steps=5,
        log_every=5,
        seed=0,
    )
    values.update(overrides)
    return ForkMergeConfig(**values)


@dataclass
class TrackedRun:
    store: TrackingStore
    tracker: MlflowTracker
    comparison: Comparison
    runs: dict[str, Any]  # method -> mlflow Run (top level)
    children: list[Any]  # branch runs of the ForkMerge run


def read_back(store: TrackingStore) -> tuple[dict[str, Any], list[Any]]:
    found = store.client.search_runs([store.experiment_id], max_results=100)
    top = {r.data.tags["method"]: r for r in found if "mlflow.parentRunId" not in r.data.tags}
    children = [r for r in found if "mlflow.parentRunId" in r.data.tags]
    return top, children


def tracked_run(
    uri: str, *, experiment: str = EXPERIMENT, client_wrapper: Any = None
) -> TrackedRun:
    """STL, EW and a 3-branch ForkMerge (4 merges) on the toy problem, tracked to ``uri``."""
    store = open_store(uri, experiment=experiment)
    if client_wrapper is not None:
        store.client = client_wrapper(store.client)
    tracker = MlflowTracker(store, higher_is_better=False)
    events = EventStream([tracker])
    try:
        comparison = run_methods(ToyProblem(), tiny_config(), events=events)
    finally:
        events.close()
    if client_wrapper is not None:
        store.client = store.client.wrapped
    top, children = read_back(store)
    return TrackedRun(store, tracker, comparison, top, children)


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    open_store(f"sqlite:///{path}", experiment="template")
    return path


def copy_store(empty_store: Path, folder: Path) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(empty_store, folder / "mlflow.db")
    return f"sqlite:///{folder / 'mlflow.db'}"


@pytest.fixture(scope="module")
def tracked(empty_store: Path, tmp_path_factory: pytest.TempPathFactory) -> TrackedRun:
    return tracked_run(copy_store(empty_store, tmp_path_factory.mktemp("tracked")))


def history(store: TrackingStore, run: Any, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in store.client.get_metric_history(run.info.run_id, key)]


def artifact_names(store: TrackingStore, run: Any, path: str | None = None) -> set[str]:
    return {Path(f.path).name for f in store.client.list_artifacts(run.info.run_id, path)}


def download(store: TrackingStore, run: Any, path: str, tmp_path: Path) -> Path:
    return Path(store.client.download_artifacts(run.info.run_id, path, str(tmp_path)))


# --- layout, params, metrics -------------------------------------------------------------------


def test_run_layout_parent_children_and_sibling_baselines(tracked: TrackedRun) -> None:
    runs, children = tracked.runs, tracked.children
    assert set(runs) == {"stl", "ew", "forkmerge"}
    fm = runs["forkmerge"]
    branches = [b.name for b in tracked.comparison.forkmerge.branches]  # type: ignore[union-attr]
    assert len(branches) == 3
    # Exactly one child per branch, all under the ForkMerge run; baselines have none.
    assert sorted(c.data.tags["branch"] for c in children) == sorted(branches)
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {fm.info.run_id}
    for run in (*runs.values(), *children):
        tags = run.data.tags
        assert tags["seed"] == "0" and tags["benchmark"] == "toy" and tags["target"] == "t0"
        assert run.info.status == "FINISHED"
        assert tags["fm_optuna.invocation"] == tracked.tracker.invocation
    assert {runs[m].data.tags["method"] for m in runs} == {"stl", "ew", "forkmerge"}
    assert fm.info.run_name == "forkmerge-seed0"
    assert runs["stl"].data.tags["fm_optuna.role"] == "baseline"
    assert tracked.tracker.error is None and not tracked.tracker.unlogged
    # Artifacts go beside the SQLite file, never to ./mlruns.
    assert "/mlartifacts/" in fm.info.artifact_uri
    assert not (Path.cwd() / "mlruns").exists()


def test_params_hold_config_branch_weights_and_versions(tracked: TrackedRun) -> None:
    params = tracked.runs["forkmerge"].data.params
    assert params["dt"] == "10" and params["total_steps"] == "40"
    assert params["strategy"] == "grid" and params["benchmark"] == "toy"
    for branch in tracked.comparison.forkmerge.branches:  # type: ignore[union-attr]
        expected = ",".join(f"{t}={w:g}" for t, w in branch.weights.items() if w)
        assert params[f"branch/{metric_key(branch.name)}/weights"] == expected
    for package in ("torch", "optuna", "mlflow", "fm_optuna"):
        assert params[f"version/{package}"]
    child = tracked.children[0]
    assert child.data.params["weights"]


def test_lambda_series_one_point_per_merge_summing_to_one(tracked: TrackedRun) -> None:
    fm_result = tracked.comparison.forkmerge
    assert fm_result is not None
    fm, store = tracked.runs["forkmerge"], tracked.store
    series = {
        b.name: history(store, fm, f"lambda/{metric_key(b.name)}") for b in fm_result.branches
    }
    for points in series.values():
        assert [step for step, _ in points] == fm_result.steps == [10, 20, 30, 40]
    for index, decision in enumerate(fm_result.decisions):
        logged = [series[b.name][index][1] for b in fm_result.branches]
        assert logged == pytest.approx(list(decision.weights))
        assert math.isclose(sum(logged), 1.0, abs_tol=1e-9)
    for key in ("merge/n_trials", "merge/search_seconds", "merge/best_score", "merge/gain"):
        assert [s for s, _ in history(store, fm, key)] == [10, 20, 30, 40]
    assert [v for _, v in history(store, fm, "merge/n_trials")] == [
        d.n_trials for d in fm_result.decisions
    ]
    assert [v for _, v in history(store, fm, "merge/best_score")] == pytest.approx(
        [d.score for d in fm_result.decisions]
    )
    assert len(history(store, fm, "val/mse")) == 4  # the merged model, every round


def test_branch_and_baseline_training_and_validation_metrics(tracked: TrackedRun) -> None:
    store = tracked.store
    for child in tracked.children:
        weights = child.data.params["weights"]
        tasks = [item.split("=")[0] for item in weights.split(",")]
        for task in tasks:
            steps = [s for s, _ in history(store, child, f"train/loss/{task}")]
            assert steps == [5, 10, 15, 20, 25, 30, 35, 40]
        assert [s for s, _ in history(store, child, "val/mse")] == [10, 20, 30, 40]
        assert len(history(store, child, "merge/lambda")) == 4
    for method in ("stl", "ew"):
        run = tracked.runs[method]
        assert len(history(store, run, "train/loss/t0")) == 8
        assert run.data.metrics["final/target_test"] == pytest.approx(
            tracked.comparison.result(method).target_test
        )


def test_one_merge_artifact_per_round_with_every_inner_trial(
    tracked: TrackedRun, tmp_path: Path
) -> None:
    fm_result = tracked.comparison.forkmerge
    assert fm_result is not None
    fm, store = tracked.runs["forkmerge"], tracked.store
    names = sorted(artifact_names(store, fm, "merges"))
    assert names == sorted(f"round_{r:03d}.{kind}" for r in range(1, 5) for kind in ("json", "md"))
    for round_index, decision in enumerate(fm_result.decisions, start=1):
        table = download(store, fm, f"merges/round_{round_index:03d}.md", tmp_path).read_text()
        assert table.startswith(f"### Round {round_index}, step ")
        assert table.count("\n| ") == len(decision.trials) + 2  # header, rule, a row per trial
        path = download(store, fm, f"merges/round_{round_index:03d}.json", tmp_path)
        record = json.loads(path.read_text())
        assert record["round"] == round_index
        assert record["decision"]["weights"] == pytest.approx(list(decision.weights))
        trials = record["decision"]["trials"]
        assert len(trials) == len(decision.trials) > 1
        for logged, trial in zip(trials, decision.trials, strict=True):
            assert logged["weights"] == pytest.approx(list(trial.weights))
            assert logged["state"] == trial.state and logged["source"] == trial.source
            assert {"number", "weights", "score", "state", "source"} <= set(logged)


def test_figures_and_lambda_csv(tracked: TrackedRun, tmp_path: Path) -> None:
    fm, store = tracked.runs["forkmerge"], tracked.store
    assert {"lambda_trajectory.png", "lambda_trajectory.csv", "simplex_trials.png"} <= (
        artifact_names(store, fm)
    )
    for name in ("lambda_trajectory.png", "simplex_trials.png"):
        data = download(store, fm, name, tmp_path).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000
    rows = list(
        csv.DictReader(
            io.StringIO(download(store, fm, "lambda_trajectory.csv", tmp_path).read_text())
        )
    )
    assert [int(r["step"]) for r in rows] == [10, 20, 30, 40]
    for row in rows:
        assert sum(float(v) for k, v in row.items() if k.startswith("lambda/")) == pytest.approx(1)


def test_summary_attached_to_every_method_run(tracked: TrackedRun, tmp_path: Path) -> None:
    store = tracked.store
    for method, run in tracked.runs.items():
        assert {"summary.json", "summary.md"} <= artifact_names(store, run)
        summary = json.loads(download(store, run, "summary.json", tmp_path / method).read_text())
        rows = {row["method"]: row for row in summary["methods"]}
        assert set(rows) == {"stl", "ew", "forkmerge"}
        for name, row in rows.items():
            result = tracked.comparison.result(name)
            assert row["target_test"] == pytest.approx(result.target_test)
            assert row["tg"] == pytest.approx(result.tg)  # same TG as the CLI's table
        assert run.data.metrics["transfer/tg"] == pytest.approx(
            tracked.comparison.result(method).tg
        )
    table = download(store, tracked.runs["stl"], "summary.md", tmp_path / "md").read_text()
    assert "| forkmerge |" in table and "TG vs STL" in table


def test_unfinished_run_is_closed_as_killed(empty_store: Path, tmp_path: Path) -> None:
    store = open_store(copy_store(empty_store, tmp_path), experiment="crash")
    tracker = MlflowTracker(store)
    tracker.on_run_started(
        RunStarted(run="forkmerge", params={"seed": 1}, branches={"a": {"t0": 1.0}}, total_steps=4)
    )
    tracker.close()  # as EventStream.close in a `finally` after training raised
    top, children = read_back(store)
    assert top["forkmerge"].info.status == "KILLED" and children[0].info.status == "KILLED"
    assert top["forkmerge"].data.tags["fm_optuna.status"] == "UNFINISHED"


# --- faults ------------------------------------------------------------------------------------


class FlakyClient:
    """Passes calls to MLflow until ``fail_after`` writes, then every write raises."""

    WRITES = ("create_run", "log_batch", "log_text", "log_artifact", "set_terminated")

    def __init__(self, wrapped: Any, fail_after: int) -> None:
        self.wrapped, self.fail_after, self.writes = wrapped, fail_after, 0

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.wrapped, name)
        if name not in self.WRITES:
            return attribute

        def write(*args: Any, **kwargs: Any) -> Any:
            self.writes += 1
            if self.writes > self.fail_after:
                raise ConnectionError(f"lost the database at {PG_URI}")
            return attribute(*args, **kwargs)

        return write


def test_tracking_failure_mid_run_keeps_training_and_reports_what_was_lost(
    tracked: TrackedRun, empty_store: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="fm_optuna.tracking")
    flaky = tracked_run(
        copy_store(empty_store, tmp_path),
        client_wrapper=lambda client: FlakyClient(client, fail_after=12),
    )
    # Training went on to the end, unchanged: same methods, same Λ trajectory as untroubled.
    assert [r.method for r in flaky.comparison.results] == ["stl", "ew", "forkmerge"]
    assert flaky.comparison.forkmerge.lambda_history == (  # type: ignore[union-attr]
        tracked.comparison.forkmerge.lambda_history  # type: ignore[union-attr]
    )
    tracker = flaky.tracker
    assert tracker.error is not None and tracker.error.startswith("ConnectionError")
    assert tracker.unlogged["metrics"] > 0 and tracker.unlogged["artifacts"] > 0
    warnings = [r.getMessage() for r in caplog.records if r.name == "fm_optuna.tracking"]
    assert len(warnings) == 2  # once when it failed, once at the end with the counts
    assert "failed" in warnings[0] and "not logged:" in warnings[1]
    assert f"{tracker.unlogged['metrics']} metrics" in warnings[1]
    assert SECRET not in caplog.text and "ana:***@" in caplog.text
    # What was written before the failure is in the store.
    assert flaky.runs


def test_an_error_inside_the_observer_never_reaches_training(
    empty_store: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="fm_optuna.tracking")
    store = open_store(copy_store(empty_store, tmp_path), experiment="bug")
    tracker = MlflowTracker(store)
    tracker.on_run_started(
        RunStarted(run="forkmerge", params={"seed": 0}, branches={"a": {"t0": 1.0}}, total_steps=2)
    )
    inconsistent = MergeCompleted(  # one branch, two weights: the observer's zip raises
        run="forkmerge",
        round=1,
        step=2,
        branches=("a",),
        decision=MergeDecision((0.5, 0.5), 0.0, (), 0.0, "grid"),
        merged_metrics={},
        best_branch_score=0.0,
    )
    tracker.on_merge_completed(inconsistent)  # does not raise
    tracker.close()
    assert tracker.error is not None and tracker.error.startswith("ValueError")
    assert tracker.unlogged["events"] == 1
    assert len([r for r in caplog.records if r.name == "fm_optuna.tracking"]) == 2


def test_passwords_never_reach_params_tags_or_messages(empty_store: Path, tmp_path: Path) -> None:
    assert mask_uri(PG_URI) == "postgresql://ana:***@127.0.0.1:1/mlflow"
    assert mask_uri("http://bob:p%40ss@mlflow.lan:5000") == "http://bob:***@mlflow.lan:5000"
    store = open_store(copy_store(empty_store, tmp_path), experiment="masking")
    tracker = MlflowTracker(store, tags={"storage": PG_URI})
    params = {"seed": 0, "storage": PG_URI, "note": f"optuna at {PG_URI}"}
    tracker.on_run_started(RunStarted(run="stl", params=params, branches={}, total_steps=1))
    tracker.close()
    run = read_back(store)[0]["stl"]
    assert SECRET not in json.dumps([run.data.params, run.data.tags])
    assert run.data.params["storage"] == mask_uri(PG_URI)
    assert run.data.tags["storage"] == mask_uri(PG_URI)


@pytest.mark.parametrize(
    "make_uri",
    [
        pytest.param(lambda tmp: PG_URI, id="postgresql-refused"),
        pytest.param(lambda tmp: f"http://127.0.0.1:{free_port()}", id="http-no-server"),
        pytest.param(
            lambda tmp: f"sqlite:///{tmp / 'a-file' / 'mlflow.db'}", id="sqlite-unwritable"
        ),
        pytest.param(lambda tmp: f"ftp://{tmp}", id="unsupported-scheme"),
    ],
)
def test_unreachable_store_is_a_config_error(
    make_uri: Callable[[Path], str], tmp_path: Path
) -> None:
    (tmp_path / "a-file").write_text("not a folder")
    started = time.perf_counter()
    with pytest.raises(ConfigError) as error:
        open_store(make_uri(tmp_path), experiment="x")
    message = str(error.value)
    assert "\n" not in message and SECRET not in message
    assert time.perf_counter() - started < 15  # no minutes of MLflow retries


def test_cli_fails_in_one_line_before_any_training(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from fm_optuna import cli
    from fm_optuna.cli import _run
    from fm_optuna.experiments import _run_methods as experiment

    def no_training(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("training started although the store cannot be opened")

    monkeypatch.setattr(_run, "run_problem", lambda args: ToyProblem())
    monkeypatch.setattr(experiment, "run_methods", no_training)
    code = cli.main(["run", "--tracking-uri", PG_URI, "--steps", "4", "--dt", "2"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("fm-optuna run: error: Cannot open")
    assert SECRET not in err and "ana:***@" in err


POSTGRES_URL = os.environ.get("FM_OPTUNA_TEST_POSTGRES_URL")


def tracking_database(url: str) -> str:
    """A database of its own on the test server: MLflow and Optuna would both claim the
    ``alembic_version`` table of a shared one."""
    import sqlalchemy

    parts = urllib.parse.urlsplit(url)
    name = "fm_optuna_tracking_test"
    engine = sqlalchemy.create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            exists = connection.execute(
                sqlalchemy.text("SELECT 1 FROM pg_database WHERE datname = :name"), {"name": name}
            ).scalar()
            if not exists:
                connection.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    finally:
        engine.dispose()
    return urllib.parse.urlunsplit(parts._replace(path=f"/{name}"))


@pytest.mark.postgres
@pytest.mark.skipif(
    POSTGRES_URL is None, reason="FM_OPTUNA_TEST_POSTGRES_URL is not set (.ci/postgres.sh)"
)
def test_postgresql_store_same_layout_and_no_password(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert POSTGRES_URL is not None
    uri = tracking_database(POSTGRES_URL)
    password = urllib.parse.urlsplit(uri).password
    monkeypatch.setenv("FM_OPTUNA_ARTIFACT_ROOT", str(tmp_path / "artifacts"))
    run = tracked_run(uri, experiment=f"fm-optuna/toy-t0-{time.time_ns()}")
    assert set(run.runs) == {"stl", "ew", "forkmerge"} and len(run.children) == 3
    assert run.tracker.error is None
    assert run.runs["forkmerge"].info.artifact_uri.startswith((tmp_path / "artifacts").as_uri())
    assert "merges" in artifact_names(run.store, run.runs["forkmerge"])
    assert password and f":{password}@" not in run.store.display_uri
    for logged in (*run.runs.values(), *run.children):
        assert f":{password}@" not in json.dumps([logged.data.params, logged.data.tags])


# --- fm-optuna ui ------------------------------------------------------------------------------


@dataclass
class UiServer:
    url: str
    process: subprocess.Popen[str]
    lines: queue.Queue[str]
    stdout: list[str]


@contextlib.contextmanager
def serve_ui(uri: str, *, timeout: float = 120.0) -> Iterator[UiServer]:
    """`fm-optuna ui --port 0` in a subprocess; yields once it prints its URL; stops it with
    SIGINT, as Ctrl-C would, and checks that it stopped cleanly."""
    process = subprocess.Popen(
        [sys.executable, "-m", "fm_optuna.cli", "ui", "--tracking-uri", uri, "--port", "0"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"},
        # As in a terminal: a suite started in the background inherits SIGINT ignored, and a
        # Python started with SIGINT ignored keeps ignoring it (no KeyboardInterrupt).
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert process.stdout is not None and process.stderr is not None
    lines: queue.Queue[str] = queue.Queue()
    stderr: list[str] = []
    readers = [
        threading.Thread(target=lambda: [lines.put(x) for x in process.stdout], daemon=True),
        threading.Thread(target=lambda: stderr.extend(process.stderr), daemon=True),
    ]
    for reader in readers:
        reader.start()
    stdout: list[str] = []
    try:
        deadline = time.monotonic() + timeout
        url = None
        while url is None:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"fm-optuna ui printed no URL in {timeout:.0f} s: {stderr[-5:]}")
            stdout.append(line)
            match = re.search(r"(http://127\.0\.0\.1:\d+)", line)
            if match and "MLflow UI at" in line:
                url = match.group(1)
        yield UiServer(url, process, lines, stdout)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
        try:
            code = process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
        finally:
            for reader in readers:
                reader.join(timeout=10)
            process.stdout.close()
            process.stderr.close()
    while not lines.empty():
        stdout.append(lines.get())
    assert code in (0, 130), (code, stderr[-10:])
    assert not any("Traceback" in line for line in stderr), "".join(stderr)
    assert any("stopped" in line for line in stdout)


def test_ui_serves_the_store_on_loopback_and_stops_on_ctrl_c(tracked: TrackedRun) -> None:
    with serve_ui(tracked.store.uri) as server:
        assert server.url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(server.url + "/health", timeout=10) as response:
            assert response.status == 200
        request = urllib.request.Request(
            server.url
            + "/api/2.0/mlflow/experiments/get-by-name?experiment_name="
            + urllib.parse.quote(EXPERIMENT)
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            found = json.load(response)["experiment"]
        assert found["experiment_id"] == tracked.store.experiment_id
        # The links `fm-optuna ui` prints: the runs table and the latest ForkMerge run, both in
        # the model-training view (the browser test opens them).
        from fm_optuna.tracking.ui import browse_links

        eid, fm = tracked.store.experiment_id, tracked.runs["forkmerge"]
        lines = browse_links(server.url, experiment=EXPERIMENT)
        start = f"{server.url}/fm-optuna/start?to="  # stores the model-training view
        assert lines == [
            f"  {EXPERIMENT}: {start}/experiments/{eid}/runs?workflowType=machine_learning",
            f"    latest ForkMerge run forkmerge-seed0: {start}/experiments/{eid}/runs/"
            f"{fm.info.run_id}?workflowType=machine_learning",
        ]
        with urllib.request.urlopen(lines[1].split()[-1], timeout=30) as response:
            page = response.read().decode()
        assert '"mlflow.workflowType_v1"' in page
        assert f"../#/experiments/{eid}/runs/{fm.info.run_id}" in page
        with pytest.raises(ConfigError, match="experiment"):
            browse_links(server.url, experiment="no-such-experiment")
    port = int(server.url.rsplit(":", 1)[1])
    with socket.socket() as probe:  # the server is gone: its port is free again
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is not a server
        probe.bind(("127.0.0.1", port))


def test_ui_refuses_a_missing_store_and_an_unreachable_server_uri(tmp_path: Path) -> None:
    from fm_optuna.tracking.ui import run_ui

    with pytest.raises(ConfigError, match="does not exist"):
        run_ui(f"sqlite:///{tmp_path / 'none.db'}", port=0, announce=lambda line: None)
    # A server URI starts nothing (the server serves its UI); one that does not answer is a line.
    with pytest.raises(ConfigError, match="a reachable MLflow server") as error:
        run_ui(f"http://ana:{SECRET}@127.0.0.1:1", port=0, announce=lambda line: None)
    assert SECRET not in str(error.value)


def test_a_merge_fallback_and_a_diverged_branch_are_tagged(
    empty_store: Path, tmp_path: Path
) -> None:
    """Branch `all` (the only one training t1) goes NaN in round 2: the merge leaves it out."""
    store = open_store(copy_store(empty_store, tmp_path), experiment="fallback")
    events = EventStream([MlflowTracker(store, higher_is_better=False)])
    problem = ToyProblem(nan_task="t1", nan_after=12)
    try:
        run_methods(problem, tiny_config(branches=2, ranking="given"), ("forkmerge",), events)
    finally:
        events.close()
    top, children = read_back(store)
    fallback = top["forkmerge"].data.tags["fm_optuna.merge_fallback"]
    assert fallback.startswith("round 4: branch all went non-finite (t1 at step 31)")
    assert top["forkmerge"].info.status == "FINISHED"
    (branch,) = [run for run in children if run.data.tags["branch"] == "all"]
    assert branch.data.tags["fm_optuna.non_finite"].startswith("round 4: training loss became nan")


@pytest.mark.postgres
@pytest.mark.skipif(
    POSTGRES_URL is None, reason="FM_OPTUNA_TEST_POSTGRES_URL is not set (.ci/postgres.sh)"
)
def test_workers_opening_one_postgresql_experiment_together_all_open_it(tmp_path: Path) -> None:
    """Workers of a shared study open the same experiment at once (CI saw the second one's
    write probe refused with a unique-key conflict). An experiment made elsewhere (the UI,
    an older fm_optuna) lacks the probe's tag, so every worker's first probe inserts it."""
    assert POSTGRES_URL is not None
    from mlflow import MlflowClient

    uri = tracking_database(POSTGRES_URL)
    experiment = f"made-elsewhere-{time.time_ns()}"
    with warnings.catch_warnings():  # MLflow's own SQLAlchemy deprecation, as open_store does
        warnings.filterwarnings("ignore", message="The ``noload`` loader strategy")
        MlflowClient(uri).create_experiment(experiment, artifact_location=str(tmp_path / "a"))
    start = time.time() + 8  # all workers past their imports, then one moment
    worker = (
        "import sys, time\n"
        "from fm_optuna.tracking import open_store\n"
        "from fm_optuna.tracking.store import _client\n"
        f"_client({uri!r}).get_experiment_by_name({experiment!r})\n"
        f"time.sleep(max(0.0, {start} - time.time()))\n"
        f"open_store({uri!r}, experiment={experiment!r})\n"
    )
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", worker],
            cwd=REPO,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"},
        )
        for _ in range(4)
    ]
    errors = [w.communicate(timeout=120)[1] for w in workers]
    assert [w.returncode for w in workers] == [0, 0, 0, 0], "\n".join(errors)[-3000:]


def test_a_baselines_window_metrics_are_logged_beside_its_losses(
    empty_store: Path, tmp_path: Path
) -> None:
    store = open_store(copy_store(empty_store, tmp_path), experiment=EXPERIMENT)
    events = EventStream([MlflowTracker(store, higher_is_better=False)])
    try:
        run_methods(ToyProblem(n_tasks=2), tiny_config(total_steps=20), ("itmtl",), events)
    finally:
        events.close()
    top, _ = read_back(store)
    run = top["itmtl"]
    chosen = {c: history(store, run, f"train/candidate/{c}/chosen") for c in ("ew", "t0", "t1")}
    assert all([s for s, _ in series] == [5, 10, 15, 20] for series in chosen.values())
    for window in zip(*chosen.values(), strict=True):
        assert sum(value for _, value in window) == pytest.approx(1.0)
    assert len(history(store, run, "train/candidate/ew/transference")) == 4
