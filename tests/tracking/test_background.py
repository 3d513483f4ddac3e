"""Tracking off the training path (issue 20): the background writer, and the MLflow tracker on it.

The writer's tests synchronise with events, never with sleeps or clocks. The tracker's tests use
a real SQLite store (one migrated template per module, copied for each test).
"""

from __future__ import annotations

import logging
import shutil
import signal
import threading
from pathlib import Path
from typing import Any

import pytest

from fm_optuna.config import ForkMergeConfig
from fm_optuna.core._events import EventStream, MergeCompleted, Observer, TrainingProgress
from fm_optuna.core._loop import run_forkmerge
from fm_optuna.errors import ConfigError, Interrupted
from fm_optuna.tracking import MlflowTracker, TrackingStore, open_store
from fm_optuna.tracking import store as store_module
from fm_optuna.tracking.background import BackgroundWriter
from fm_optuna.tracking.observer import captured
from tests.conftest import ToyProblem

# --- the writer ----------------------------------------------------------------------------------


def test_jobs_run_in_order_on_one_other_thread_and_close_runs_them_all() -> None:
    writer = BackgroundWriter()
    seen: list[tuple[int, str]] = []
    for item in range(200):
        writer.submit(lambda item=item: seen.append((item, threading.current_thread().name)))
    writer.close()
    assert [item for item, _ in seen] == list(range(200))
    assert {name for _, name in seen} == {"fm-optuna-tracking"}
    assert writer.pending == 0


def test_wait_returns_once_that_job_is_done_and_later_ones_may_still_run() -> None:
    writer = BackgroundWriter()
    release, done = threading.Event(), []
    first = writer.submit(lambda: done.append("first"))
    writer.submit(lambda: (release.wait(), done.append("second")))
    writer.wait(first)
    assert done[:1] == ["first"]
    release.set()
    writer.wait()
    assert done == ["first", "second"]
    writer.close()


def test_an_error_is_raised_once_in_the_caller_and_later_jobs_are_skipped() -> None:
    writer = BackgroundWriter()
    ran: list[int] = []

    def fail() -> None:
        raise OSError(28, "No space left on device")

    writer.submit(lambda: ran.append(1))
    failing = writer.submit(fail)
    writer.submit(lambda: ran.append(3))
    with pytest.raises(OSError, match="No space left on device"):
        writer.wait(failing)
    writer.close()  # raised already: closing does not raise it a second time
    assert ran == [1] and writer.skipped == 1


def test_an_error_surfaces_at_close_when_nothing_waited() -> None:
    writer = BackgroundWriter()
    writer.submit(lambda: [][1])
    with pytest.raises(IndexError):
        writer.close()
    with pytest.raises(RuntimeError, match="closed"):
        writer.submit(lambda: None)


def test_a_job_knows_when_a_later_one_of_its_kind_is_queued() -> None:
    writer = BackgroundWriter()
    release = threading.Event()
    answers: list[bool] = []

    def draw() -> None:
        release.wait()
        answers.append(writer.superseded("figures"))

    writer.submit(draw, key="figures")
    writer.submit(draw, key="figures")
    release.set()
    writer.close()
    assert answers == [True, False]  # only the newest redraw has to happen


# --- the tracker on it ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    open_store(f"sqlite:///{path}", experiment="template")
    return path


def copied(template: Path, folder: Path, experiment: str = "bg") -> TrackingStore:
    shutil.copy(template, folder / "mlflow.db")
    return open_store(f"sqlite:///{folder / 'mlflow.db'}", experiment=experiment)


def config(**overrides: Any) -> ForkMergeConfig:
    values: dict[str, Any] = dict(
        dt=10, total_steps=40, strategy="grid", grid_resolution=0.25, branches=3,
        ranking_steps=5, log_every=5, seed=0,
    )  # fmt: skip
    return ForkMergeConfig(**{**values, **overrides})


def runs(store: TrackingStore) -> tuple[Any, list[Any]]:
    found = store.client.search_runs([store.experiment_id])
    top = [r for r in found if "mlflow.parentRunId" not in r.data.tags]
    assert len(top) == 1
    return top[0], [r for r in found if "mlflow.parentRunId" in r.data.tags]


class StopAt(Observer):
    """Raises ``error`` after the tracker has seen merge ``round``."""

    def __init__(self, round: int, error: BaseException) -> None:
        self.round, self.error = round, error

    def on_merge_completed(self, event: MergeCompleted) -> None:
        if event.round == self.round:
            raise self.error


class Recorder(Observer):
    """What the store holds right after the tracker's merge hook returned."""

    def __init__(self, tracker: MlflowTracker) -> None:
        self.tracker, self.seen = tracker, []

    def on_merge_completed(self, event: MergeCompleted) -> None:
        store = self.tracker.store
        run_id = self.tracker._log.run_id(event.run)  # the worker is idle at this point
        assert run_id is not None
        lambdas = store.client.get_metric_history(run_id, "merge/round")
        note = store.client.get_run(run_id).data.tags["mlflow.note.content"]
        self.seen.append((len(lambdas), f"| {event.round} | {event.step} |" in note))


def test_a_merge_is_in_the_store_when_its_hook_returns(template: Path, tmp_path: Path) -> None:
    store = copied(template, tmp_path)
    tracker = MlflowTracker(store, higher_is_better=False)
    recorder = Recorder(tracker)
    events = EventStream([tracker, recorder])
    try:
        run_forkmerge(ToyProblem(), config(), events)
    finally:
        events.close()
    # Metrics and the Λ note of every merge, up to the last one: the overview is never behind.
    assert recorder.seen == [(1, True), (2, True), (3, True), (4, True)]
    top, children = runs(store)
    assert top.info.status == "FINISHED" and {c.info.status for c in children} == {"FINISHED"}
    names = {f.path for f in store.client.list_artifacts(top.info.run_id)}
    assert {"lambda_trajectory.png", "lambda_trajectory.csv", "simplex_trials.png"} <= names
    assert tracker.background_seconds > 0 and tracker.error is None


@pytest.mark.parametrize(
    ("error", "status", "tag"),
    [
        (Interrupted(signal.SIGTERM), "KILLED", "UNFINISHED"),
        (KeyboardInterrupt(), "KILLED", "UNFINISHED"),
        (RuntimeError("an observer broke"), "FAILED", "FAIL"),
    ],
)
def test_an_interrupted_or_failed_run_is_flushed_and_ended(
    template: Path, tmp_path: Path, error: BaseException, status: str, tag: str
) -> None:
    store = copied(template, tmp_path)
    tracker = MlflowTracker(store, higher_is_better=False)
    events = EventStream([tracker, StopAt(2, error)])
    with pytest.raises(type(error)):
        try:
            run_forkmerge(ToyProblem(), config(), events)
        finally:
            events.close()  # as every door does in a `finally`
    top, children = runs(store)
    assert top.info.status == status and {c.info.status for c in children} == {status}
    assert top.data.tags["fm_optuna.status"] == tag
    rounds = store.client.get_metric_history(top.info.run_id, "merge/round")
    assert sorted(m.value for m in rounds) == [1.0, 2.0]  # nothing lost up to the stop
    merges = {f.path for f in store.client.list_artifacts(top.info.run_id, "merges")}
    assert {"merges/round_001.json", "merges/round_002.json"} <= merges
    names = {f.path for f in store.client.list_artifacts(top.info.run_id)}
    assert "lambda_trajectory.png" in names  # drawn from the merges done


def test_an_event_is_copied_when_emitted(template: Path, tmp_path: Path) -> None:
    store = copied(template, tmp_path)
    tracker = MlflowTracker(store)
    losses = {"t0": 1.0}
    event = TrainingProgress(run="stl", branch="", step=5, losses=losses)
    copy = captured(event)
    losses["t0"] = 99.0  # the loop reuses its structures after emitting
    assert copy.losses == {"t0": 1.0} and copy is not event
    merge = MergeCompleted(
        run="fm", round=1, step=1, branches=(), decision=None,  # type: ignore[arg-type]
        merged_metrics={}, best_branch_score=0.0, snapshot=lambda: {"live": True},
    )  # fmt: skip
    assert captured(merge).snapshot is None  # reads live state: never called later
    tracker.close()


def test_a_bad_new_store_is_refused_at_once_and_a_late_failure_is_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "mlflow.db").mkdir()  # a folder where the database file should be
    with pytest.raises(ConfigError, match="not writable"):
        open_store(f"sqlite:///{locked / 'mlflow.db'}", experiment="x", background=True)

    def fails(uri: str, experiment: str) -> Any:
        raise ConfigError("Cannot open the MLflow tracking store: disk full")

    monkeypatch.setattr(store_module, "_open_new", fails)
    caplog.set_level(logging.WARNING, logger="fm_optuna.tracking")
    store = open_store(f"sqlite:///{tmp_path / 'new.db'}", experiment="x", background=True)
    tracker = MlflowTracker(store)
    events = EventStream([tracker])
    try:
        run_forkmerge(ToyProblem(), config(total_steps=20), events)  # training is unaffected
    finally:
        events.close()
    assert tracker.error is not None and "disk full" in tracker.error
    messages = [r.getMessage() for r in caplog.records if r.name == "fm_optuna.tracking"]
    assert len(messages) == 2 and "not logged:" in messages[1]


def test_a_new_store_opened_in_the_background_gets_the_run(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'new.db'}", experiment="x", background=True)
    tracker = MlflowTracker(store)
    events = EventStream([tracker])
    try:
        run_forkmerge(ToyProblem(), config(total_steps=20), events)
    finally:
        events.close()
    top, children = runs(store)
    assert top.info.status == "FINISHED" and len(children) == 3
    assert store.is_open and store.opening_seconds > 0 and tracker.error is None
