"""A tracking server that stops answering: one line while it is waited for, one when it is back,
and, past MLflow's retries, one line and no traceback (fm_optuna/tracking/server_watch.py).

The fakes synchronise with events: a call blocks until the test lets the "server" answer or the
"retries" run out. One test talks to a real refused port through a real MlflowClient.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest

from fm_optuna.config import ForkMergeConfig
from fm_optuna.core._events import EventStream
from fm_optuna.core._loop import run_forkmerge
from fm_optuna.experiments._bench_cluster import free_port
from fm_optuna.tracking import MlflowTracker, TrackingStore
from fm_optuna.tracking.background import BackgroundWriter
from fm_optuna.tracking.server_watch import (
    ServerWatch,
    TrackingUnavailable,
    WatchedClient,
    health,
    retry_seconds,
)
from fm_optuna.tracking.store import _Opened
from tests.conftest import ToyProblem

URI = "http://ana:s3cret@127.0.0.1:5000"
MASKED = "http://ana:***@127.0.0.1:5000"
REFUSED = "Connection refused"
RAN_OUT = (
    "API request to http://127.0.0.1:5000/api/2.0/mlflow/runs/log-batch failed with exception "
    "HTTPConnectionPool(host='127.0.0.1', port=5000): Max retries exceeded with url: ..."
)


class Server:
    """A fake server: up, or down (calls block until it is up again or the retries run out)."""

    def __init__(self) -> None:
        self.up = threading.Event()
        self.up.set()
        self.ran_out = threading.Event()
        self.blocked = threading.Event()  # a call is waiting for the server

    def go_down(self) -> None:
        self.up.clear()

    def probe(self, uri: str) -> str | None:
        return None if self.up.is_set() else REFUSED

    def answer(self) -> None:
        while not self.up.is_set():
            self.blocked.set()
            if self.ran_out.is_set():
                raise RuntimeError(RAN_OUT)
            self.up.wait(0.01)


class Lines:
    """What a watch says, and an event per expected phrase."""

    def __init__(self) -> None:
        self.said: list[str] = []
        self._events: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def __call__(self, line: str) -> None:
        with self._lock:
            self.said.append(line)
            for phrase, event in self._events.items():
                if phrase in line:
                    event.set()

    def when(self, phrase: str) -> threading.Event:
        with self._lock:
            event = self._events.setdefault(phrase, threading.Event())
            if any(phrase in line for line in self.said):
                event.set()
            return event


def watch(server: Server, lines: Lines, **kwargs: Any) -> ServerWatch:
    return ServerWatch(URI, patience=0.05, every=0.01, probe=server.probe, say=lines, **kwargs)


class FakeClient:
    """The MlflowClient calls the tracker makes, each one answered by ``server``."""

    def __init__(self, server: Server) -> None:
        self.server, self.calls = server, 0
        self.runs: dict[str, str] = {}

    def _answer(self) -> None:
        self.calls += 1
        self.server.answer()

    def create_run(self, experiment_id: str, **kwargs: Any) -> Any:
        self._answer()
        run_id = f"run{len(self.runs)}"
        self.runs[run_id] = "RUNNING"
        return SimpleNamespace(info=SimpleNamespace(run_id=run_id))

    def set_terminated(self, run_id: str, status: str) -> None:
        self._answer()
        self.runs[run_id] = status

    def __getattr__(self, name: str) -> Callable[..., None]:  # log_batch, log_text, ...
        return lambda *args, **kwargs: self._answer()


def test_a_blocked_job_is_said_once_and_its_end_too() -> None:
    server, lines = Server(), Lines()
    client = WatchedClient(FakeClient(server), watch(server, lines))
    writer = BackgroundWriter()
    server.go_down()
    for _ in range(3):  # three jobs meet the outage, one after the other
        writer.submit(lambda: client.log_batch("run0"))
    assert lines.when("does not answer").wait(10)
    server.up.set()  # restarted
    writer.close()
    assert lines.when("answers again").wait(10)
    assert len(lines.said) == 2, lines.said
    waiting, back = lines.said
    assert waiting.startswith(f"fm-optuna: the MLflow tracking server {MASKED} does not answer")
    assert "s3cret" not in waiting and f"does not answer ({REFUSED}): waiting" in waiting
    assert f"waiting up to {retry_seconds():.0f} s" in waiting
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES=" in waiting
    assert back == f"fm-optuna: the MLflow tracking server {MASKED} answers again"


def test_a_slow_call_to_a_server_that_answers_says_nothing() -> None:
    lines = Lines()
    probed = threading.Event()

    def probe(uri: str) -> str | None:
        probed.set()
        return None

    slow = ServerWatch(URI, patience=0.01, every=0.01, probe=probe, say=lines)
    with slow.calling():
        assert probed.wait(10)  # the call outlived the patience: the server was asked
    assert lines.said == [] and not slow.waiting


def test_past_the_retries_one_error_then_calls_fail_at_once_until_it_answers() -> None:
    server, lines = Server(), Lines()
    fake = FakeClient(server)
    client = WatchedClient(fake, watch(server, lines))
    server.go_down()
    errors: list[BaseException] = []

    def call() -> None:
        try:
            client.log_batch("run0")
        except BaseException as error:
            errors.append(error)

    thread = threading.Thread(target=call)
    thread.start()
    assert lines.when("does not answer").wait(10)
    server.ran_out.set()
    thread.join(10)
    (first,) = errors
    assert isinstance(first, TrackingUnavailable) and not first.already_said
    assert str(first).startswith(f"the MLflow tracking server {MASKED} did not answer")
    calls = fake.calls
    with pytest.raises(TrackingUnavailable) as again:
        client.log_batch("run0")
    assert again.value.already_said and fake.calls == calls  # failed without waiting again
    server.ran_out.clear()
    server.up.set()
    assert lines.when("answers again").wait(10)
    client.log_batch("run0")  # logged again
    assert fake.calls == calls + 1


def test_an_error_the_server_sends_is_not_an_outage() -> None:
    server, lines = Server(), Lines()
    watched = watch(server, lines)

    def refuse(*args: Any) -> None:
        raise ValueError("RESOURCE_DOES_NOT_EXIST: Run 'x' not found")

    client = WatchedClient(SimpleNamespace(get_run=refuse), watched)
    with pytest.raises(ValueError, match="RESOURCE_DOES_NOT_EXIST"):
        client.get_run("x")
    assert not watched.gave_up and lines.said == []


def test_retry_seconds_follows_mlflows_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RETRIES", "FACTOR", "JITTER", "TIMEOUT"):
        monkeypatch.delenv(f"MLFLOW_HTTP_REQUEST_{name}", raising=False)
    assert retry_seconds() == 4 + 8 + 16 + 32 + 64 + 120 + 5  # MLflow 3.17's defaults
    assert retry_seconds(with_timeouts=True) == 249 + 8 * 120
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "0")
    assert retry_seconds() == 2 + 4


def test_a_real_client_and_a_refused_port(monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    uri = f"http://127.0.0.1:{free_port()}"
    assert health(uri) == "Connection refused"
    lines = Lines()
    watched = ServerWatch(uri, patience=0.2, say=lines)
    client = WatchedClient(MlflowClient(tracking_uri=uri), watched)
    started = time.monotonic()
    with pytest.raises(TrackingUnavailable) as error:
        client.get_run("0" * 32)  # MLflow retries about 3 s, then gives up
    assert not error.value.already_said and time.monotonic() - started < 30
    assert len(lines.said) == 1 and f"{uri} does not answer" in lines.said[0]
    with pytest.raises(TrackingUnavailable):
        client.get_run("0" * 32)
    assert len(lines.said) == 1


# --- the tracker through an outage ----------------------------------------------------------


def tiny_config() -> ForkMergeConfig:
    return ForkMergeConfig(
        dt=10, total_steps=40, strategy="grid", grid_resolution=0.5, branches=2,
        ranking_steps=5, log_every=5, seed=0,
    )  # fmt: skip


def server_store(client: Any) -> TrackingStore:
    return TrackingStore(URI, "x", _Opened(client, "0", "mlflow-artifacts:/0"))


def test_a_run_waits_for_a_restarted_server_and_loses_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    server, lines = Server(), Lines()
    fake = FakeClient(server)
    tracker = MlflowTracker(server_store(WatchedClient(fake, watch(server, lines))))
    restarted = threading.Thread(target=lambda: (lines.when("does not answer").wait(30), up()))

    def up() -> None:
        server.up.set()

    server.go_down()  # down from the first call, back once the waiting line is out
    restarted.start()
    events = EventStream([tracker])
    try:
        run_forkmerge(ToyProblem(), tiny_config(), events)
    finally:
        events.close()
    restarted.join(10)
    assert lines.when("answers again").wait(10)
    assert len(lines.said) == 2, lines.said
    assert tracker.error is None and not tracker.unlogged
    assert set(fake.runs.values()) == {"FINISHED"}  # every run ended
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_past_the_retries_training_goes_on_and_each_run_says_what_it_lacks(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="fm_optuna.tracking")
    server, lines = Server(), Lines()
    client = WatchedClient(FakeClient(server), watch(server, lines))
    server.go_down()
    # The outage outlasts the retries: the call waiting when the line is said gives up.
    giving_up = threading.Thread(
        target=lambda: (lines.when("does not answer").wait(30), server.ran_out.set())
    )
    giving_up.start()
    results = []
    for _ in range(2):  # two trials of a worker: the second fails fast, it does not wait
        tracker = MlflowTracker(server_store(client))
        events = EventStream([tracker])
        try:
            results.append(run_forkmerge(ToyProblem(), tiny_config(), events))
        finally:
            events.close()
        assert tracker.error is not None and "TrackingUnavailable" in tracker.error
    giving_up.join(10)
    assert len(results) == 2  # training was unaffected
    assert len(lines.said) == 1  # the process said once that it waits
    warnings = [r.getMessage() for r in caplog.records if r.name == "fm_optuna.tracking"]
    # One line when tracking stops, then one per run saying what it lacks; no traceback.
    assert len(warnings) == 3, warnings
    assert "failed (TrackingUnavailable: the MLflow tracking server" in warnings[0]
    assert all("not logged:" in w for w in warnings[1:])
    assert all("s3cret" not in w for w in warnings)
