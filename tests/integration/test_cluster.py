"""A small cluster on loopback: workers through the gRPC storage proxy (PostgreSQL behind it)
and an MLflow tracking server; the proxy and the server SIGKILLed mid-study and restarted.
`fm-optuna run` against the server reads every run back FINISHED with its artifacts.

Needs PostgreSQL on loopback (FM_OPTUNA_TEST_POSTGRES_URL, set by .ci/run); skipped without it.
The full-size version is `python -m fm_optuna.experiments._bench_cluster` (studies/RESULTS.md).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from fm_optuna.experiments._bench_cluster import (
    Cluster,
    ConnectionPeak,
    kill_and_restart,
    own_database,
)

ROOT = Path(__file__).resolve().parents[2]
URL = os.environ.get("FM_OPTUNA_TEST_POSTGRES_URL")

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.slow,
    pytest.mark.skipif(
        URL is None, reason="FM_OPTUNA_TEST_POSTGRES_URL is not set (.ci/run sets it)"
    ),
]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    assert URL is not None
    backend = own_database(URL, "fm_optuna_cluster_test_mlflow")
    running = Cluster(URL, backend, tmp_path_factory.mktemp("cluster"), proxy_threads=4)
    try:
        running.start_mlflow()
        running.start_proxy()
        yield running
    finally:
        running.close()


def test_a_run_against_the_tracking_server_ends_finished_with_its_artifacts(
    cluster: Cluster, tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    # The server's database outlives a test session: a name of this session's own.
    experiment = f"server-run-{uuid.uuid4().hex[:8]}"
    command = ["run", "--benchmark", "examples.diabetes:build", "--steps", "40", "--dt", "20"]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fm_optuna.cli",
            *command,
            "--tracking-uri",
            cluster.tracking,
            "--experiment",
            experiment,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(tracking_uri=cluster.tracking)
    found = client.get_experiment_by_name(experiment)
    assert found is not None and found.artifact_location.startswith("mlflow-artifacts:")
    runs = client.search_runs([found.experiment_id])
    assert runs and {run.info.status for run in runs} == {"FINISHED"}
    forkmerge = [r for r in runs if r.data.tags.get("fm_optuna.role") == "forkmerge"]
    assert len(forkmerge) == 1
    # Uploaded through the server (--serve-artifacts), read back through it.
    assert any(client.list_artifacts(run.info.run_id) for run in forkmerge)
    assert list((cluster.folder / "mlartifacts").rglob("*")), "the server stored the artifacts"


def _fm_optuna(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fm_optuna.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_a_tune_against_the_tracking_server_ends_finished_and_ui_only_links_to_it(
    cluster: Cluster, tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    name = f"server-tune-{uuid.uuid4().hex[:8]}"
    spec = tmp_path / f"{name}.toml"
    spec.write_text(
        f'[study]\nname = "{name}"\nn_trials = 2\nsampler = "random"\npruner = "none"\n'
        f'storage = "sqlite:///{tmp_path}/optuna.db"\ncheckpoint_dir = "{tmp_path}/ckpt"\n'
        '[problem]\nbenchmark = "examples.diabetes:build"\ntarget = "progression"\n'
        '[training]\nsteps = 40\ndt = 20\n[search]\nstrategy = "greedy"\n'
        "[space]\ndt = { low = 10, high = 20 }\n"
    )
    result = _fm_optuna("tune", str(spec), "--tracking-uri", cluster.tracking)
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(tracking_uri=cluster.tracking)
    found = client.get_experiment_by_name(f"fm-optuna/study/{name}")
    assert found is not None and found.artifact_location.startswith("mlflow-artifacts:")
    runs = client.search_runs([found.experiment_id])
    assert {run.info.status for run in runs} == {"FINISHED"}
    roles = {run.data.tags.get("fm_optuna.role") for run in runs}
    assert "study" in roles, roles
    forkmerge = [r for r in runs if r.data.tags.get("fm_optuna.role") == "forkmerge"]
    assert len(forkmerge) == 2  # one per trial, each with its files uploaded through the server
    assert all(client.list_artifacts(run.info.run_id) for run in forkmerge)
    (study,) = [r for r in runs if r.data.tags.get("fm_optuna.role") == "study"]
    note = study.data.tags.get("mlflow.note.content", "")  # the overview: a link per trial
    assert all(run.info.run_id in note for run in forkmerge), note[:500]
    # `compare` logs its comparison through the server too, every run FINISHED.
    compared = _fm_optuna(
        "compare", str(spec), "--strategies", "greedy,random", "--seeds", "1",
        "--out", str(tmp_path / "compare"), "--tracking-uri", cluster.tracking,
    )  # fmt: skip
    assert compared.returncode == 0, compared.stderr[-3000:]
    assert (tmp_path / "compare" / "strategies.json").exists()
    after = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        f"attributes.start_time >= {max(run.info.end_time for run in runs)}",
    )
    assert len(after) >= 3 and {run.info.status for run in after} == {"FINISHED"}, [
        (client.get_experiment(r.info.experiment_id).name, r.info.run_name) for r in after
    ]
    # `ui` on a server starts nothing: it prints the server's links and returns.
    shown = _fm_optuna("ui", "--tracking-uri", cluster.tracking, "--experiment", found.name)
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert f"{cluster.tracking}/#/experiments/{found.experiment_id}" in shown.stdout + shown.stderr


def test_workers_survive_a_killed_proxy_and_tracking_server(cluster: Cluster) -> None:
    report = kill_and_restart(
        cluster,
        ROOT / "examples" / "cluster.toml",
        workers=4,
        trials=8,
        kill_after=2,
        down_seconds=5,
        timeout=600,
    )
    assert report["exit_codes"] == [0], report  # every worker completed after the restart
    assert report["finished_before_kill"] >= 1
    assert report["lost_after_restart"] == []  # nothing recorded before the kill is lost
    assert report["finished"] >= 8 and report["running"] == 0
    assert report["duplicates"] == 0
    assert report["mlflow_running"] == 0 and report["mlflow_runs"] > report["finished"]
    # Each worker said once that it waits for the storage (a worker may end before the kill).
    assert max(report["waiting_lines_per_worker"]) == 1, report
    # And every worker alive through the outage said exactly once that it waits for the
    # tracking server (at most once more that it answers again), none a traceback.
    assert report["workers_alive_through_the_outage"] >= 1, report
    assert report["tracking_waiting_lines_per_worker"] == [1], report
    assert max(report["tracking_back_lines_per_worker"]) <= 1, report
    logs = [path.read_text(errors="replace") for path in cluster.folder.glob("worker*.log")]
    tracebacks = [log[log.index("Traceback") :][:3000] for log in logs if "Traceback" in log]
    assert not tracebacks, tracebacks[0]


def test_the_proxys_connections_are_named_and_bounded_by_its_pool(cluster: Cluster) -> None:
    """Sixteen clients at once get no more database connections than the proxy's threads."""
    import warnings

    from fm_optuna.study._grpc import GrpcStorage

    assert URL is not None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna's experimental-API warning, once per client
        clients = [GrpcStorage(cluster.grpc) for _ in range(16)]
    until = time.monotonic() + 3

    def busy(client: GrpcStorage) -> int:
        calls = 0
        while time.monotonic() < until:
            client.get_all_studies()
            calls += 1
        return calls

    try:
        with ConnectionPeak(URL, every=0.05) as peak, ThreadPoolExecutor(16) as pool:
            calls = sum(pool.map(busy, clients))
    finally:
        for client in clients:
            client.close()
    assert calls > 16
    assert 1 <= peak.proxy <= cluster.proxy_threads, peak.peaks
