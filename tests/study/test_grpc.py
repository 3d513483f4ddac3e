"""grpc:// storages: the address, an unreachable proxy, and heartbeats, retries, the distinct
sampler and shared baselines through a real gRPC proxy (in this process, over SQLite)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import optuna
import pytest
from optuna.distributions import IntDistribution
from optuna.trial import TrialState

from fm_optuna.errors import ConfigError
from fm_optuna.experiments._bench_cluster import free_port
from fm_optuna.study._grpc import HEARTBEAT_ATTR, GrpcStorage, check_grpc, grpc_address
from fm_optuna.study._sampler import DistinctSampler
from fm_optuna.study._shared_baselines import SharedBaselines
from fm_optuna.study._storages import check_database
from fm_optuna.study._tuner import open_storage

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("url", ["grpc://", "grpc://host", "grpc://host:port", "grpc://h:1/db"])
def test_a_malformed_address_is_one_line(url: str) -> None:
    with pytest.raises(ConfigError, match=r"Parameter `storage` should be grpc://host:port"):
        grpc_address(url)


def test_an_unreachable_proxy_is_one_line_within_the_timeout() -> None:
    url = f"grpc://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(ConfigError, match="no gRPC storage proxy answered within 1 s") as error:
        check_grpc(url, timeout=1)
    assert time.monotonic() - started < 30  # bounded, not a hang
    assert url in str(error.value)
    with pytest.raises(ConfigError, match="storage-proxy"):
        check_database(url, parameter="storage", what="a reachable Optuna storage URL")


def test_the_proxy_command_refuses_what_it_cannot_serve(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "fm_optuna.cli", "storage-proxy", "--storage", "grpc://h:1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "Parameter `storage` should be an RDB storage URL" in result.stderr


@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[str]:
    """Optuna's gRPC proxy over a SQLite storage, served from a thread of this process."""
    import grpc
    from optuna.storages._grpc.auto_generated import api_pb2_grpc
    from optuna.storages._grpc.servicer import OptunaStorageProxyService

    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'optuna.db'}")
    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    api_pb2_grpc.add_StorageServiceServicer_to_server(OptunaStorageProxyService(storage), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"grpc://127.0.0.1:{port}"
    server.stop(grace=None)
    storage.engine.dispose()


def _ask(study: optuna.Study, space: dict[str, IntDistribution] | None = None) -> optuna.Trial:
    """A trial asked outside optimize() (a worker about to die): Optuna warns, on purpose."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return study.ask(space)


def _study(storage: GrpcStorage, name: str = "s") -> optuna.Study:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.create_study(study_name=name, storage=storage, load_if_exists=True)


def test_a_dead_workers_trial_is_failed_on_its_heartbeat_and_retried(proxy: str) -> None:
    storage = open_storage(proxy, heartbeat_seconds=1, max_retry=2)
    assert isinstance(storage, GrpcStorage)
    study = _study(storage)
    dead = _ask(study, {"x": IntDistribution(0, 9)})  # a worker that asked, beat, then died
    storage.record_heartbeat(dead._trial_id)
    time.sleep(3.5)  # past the grace period (2 × 1 s) and an interval since the first answer
    seen: list[int] = []

    def objective(trial: optuna.Trial) -> float:
        seen.append(trial.suggest_int("x", 0, 9))
        return 0.0

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.optimize(objective, n_trials=1)
    trials = study.get_trials(deepcopy=False)
    assert trials[0].state == TrialState.FAIL  # failed by the next worker's stale check
    assert "sent no heartbeat for more than 2 s" in trials[0].user_attrs["fail_reason"]
    retry = trials[1]
    assert retry.system_attrs.get("failed_trial") == 0  # the retry callback enqueued it
    assert retry.params == dead.params and retry.state == TrialState.COMPLETE
    assert seen == [dead.params["x"]]
    # The running trial's heartbeat was recorded through the proxy by optimize()'s thread.
    assert isinstance(retry.system_attrs.get(HEARTBEAT_ATTR), float)


def test_a_live_trial_is_not_stale(proxy: str) -> None:
    storage = open_storage(proxy, heartbeat_seconds=5, max_retry=2)
    assert isinstance(storage, GrpcStorage)
    study = _study(storage)
    running = _ask(study)
    storage.record_heartbeat(running._trial_id)
    silent = _ask(study)  # never beat: not judged (as RDBStorage does)
    assert storage._get_stale_trial_ids(study._study_id) == []
    assert {t.state for t in study.get_trials()} == {TrialState.RUNNING}
    assert silent.number == 1


def test_right_after_an_outage_no_trial_is_judged(proxy: str) -> None:
    """Every live trial's heartbeat is old when the proxy answers again: none is failed until
    they had a grace period and an interval to beat."""
    storage = open_storage(proxy, heartbeat_seconds=1, max_retry=2)
    assert isinstance(storage, GrpcStorage)
    study = _study(storage)
    beating = _ask(study)
    storage.set_trial_system_attr(beating._trial_id, HEARTBEAT_ATTR, time.time() - 60)
    storage.recovered_at = time.monotonic()  # as after an outage, or a first answer
    assert storage._get_stale_trial_ids(study._study_id) == []
    storage.recovered_at = time.monotonic() - 10  # heard from the proxy for 10 s: judged
    assert storage._get_stale_trial_ids(study._study_id) == [beating._trial_id]


def test_the_distinct_sampler_and_shared_baselines_through_the_proxy(proxy: str) -> None:
    storage = open_storage(proxy, heartbeat_seconds=5, max_retry=0)
    space = {"x": IntDistribution(0, 3)}
    sampler = DistinctSampler(
        lambda seed: optuna.samplers.RandomSampler(seed=seed), seed=0, space=space
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study = optuna.create_study(study_name="d", storage=storage, sampler=sampler)
        study.optimize(lambda t: float(t.suggest_int("x", 0, 3)), n_trials=4)
    assert sorted(t.params["x"] for t in study.trials) == [0, 1, 2, 3]  # the space, once each

    trained: list[str] = []

    def train(method: str) -> dict[str, float]:
        trained.append(method)
        return {"val": 1.0, "test": 2.0, "seconds": 0.1}

    other = open_storage(proxy, heartbeat_seconds=5, max_retry=0)  # a second worker's client
    first = SharedBaselines(study, train, stale_after=60.0, settle_seconds=0.1)
    second = SharedBaselines(
        optuna.load_study(study_name="d", storage=other), train, stale_after=60.0
    )
    assert first.scores(["stl", "ew"], "b")["ew"]["test"] == 2.0
    assert second.scores(["stl", "ew"], "b")["stl"]["val"] == 1.0
    assert trained == ["stl", "ew"]  # each trained once, the second worker read them back


def test_a_restarted_proxys_cache_knows_the_trials_of_the_one_before(tmp_path: Path) -> None:
    """A worker suggesting a parameter of a trial it created through the proxy before a restart:
    Optuna's own cache raises KeyError for it (the worker died with a traceback); ours reads it."""
    from optuna.distributions import FloatDistribution
    from optuna.storages._cached_storage import _CachedStorage
    from optuna.study import StudyDirection

    from fm_optuna.study._proxy import RestartSafeCache

    rdb = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'optuna.db'}")
    try:
        before = RestartSafeCache(rdb)  # the proxy process that is then killed
        study_id = before.create_new_study([StudyDirection.MINIMIZE], "s")
        trial_id = before.create_new_trial(study_id)
        x = FloatDistribution(0.0, 1.0)
        with pytest.raises(KeyError):  # Optuna 5.0's cache in the restarted proxy
            _CachedStorage(rdb).set_trial_param(trial_id, "x", 0.5, x)
        after = RestartSafeCache(rdb)
        after.set_trial_param(trial_id, "x", 0.5, x)
        assert rdb.get_trial(trial_id).params == {"x": 0.5}
        assert after.get_all_trials(study_id)[0].params == {"x": 0.5}
        with pytest.raises(KeyError):  # a trial that does not exist is still Optuna's KeyError
            after.set_trial_param(trial_id + 1000, "x", 0.5, x)
    finally:
        rdb.engine.dispose()


@pytest.mark.slow
def test_a_client_hears_from_a_restarted_proxy_within_seconds(tmp_path: Path) -> None:
    """After 25 s without a proxy, gRPC's default back-off (tries 1, 1.6, 2.6, ... s apart) had
    a client hear from the restarted proxy up to about 18 s late (measured 2026-12-03), long
    after other workers, which then judged its live trial stale. Now about a second."""
    from fm_optuna.experiments._bench_cluster import start_proxy

    port, url = free_port(), f"sqlite:///{tmp_path / 'optuna.db'}"
    proxy = start_proxy(url, port, tmp_path / "proxy.log", threads=2)
    client = GrpcStorage(f"grpc://127.0.0.1:{port}", wait_seconds=120)
    try:
        client.get_all_studies()
        proxy.kill()
        answered: list[float] = []

        def call() -> None:
            client.get_all_studies()  # waits for the proxy (one line), then answers
            answered.append(time.monotonic())

        waiting = threading.Thread(target=call)
        waiting.start()
        time.sleep(25)
        proxy = start_proxy(url, port, tmp_path / "proxy.log", threads=2)
        back = time.monotonic()
        waiting.join(60)
        assert answered and answered[0] - back < 3.0, answered[0] - back if answered else None
    finally:
        client.close()
        proxy.stop()
