"""A cluster on loopback: N ``fm-optuna tune`` workers on one study, PostgreSQL directly or
through the gRPC storage proxy, MLflow through a tracking server; then the proxy and the server
SIGKILLed mid-study and restarted.

Every role is the command a cluster runs (``fm-optuna storage-proxy``, ``mlflow server``,
``fm-optuna tune``), each in its own process. Measured per storage: finished trials, duplicated
parameter sets (must be 0), MLflow runs left RUNNING (0), distinct trials per minute and the
peak number of connections to the study's database (``pg_stat_activity``, sampled every 0.25 s,
in all and by holder: the proxy's own, named by their ``application_name``, are bounded by its
pool, ``--proxy-threads``, not by the number of workers).

    python -m fm_optuna.experiments._bench_cluster examples/cluster.toml \\
        --postgres postgresql://user:password@127.0.0.1/optuna --workers 16 --trials 48

``--proxy-only --no-kill`` measures the proxy alone (e.g. at several numbers of workers).

The spec's ``[study]`` name, storage, tracking and checkpoint folder are replaced; its trials
should take a few seconds (a tiny problem). Run from the repository root when the spec names a
factory there (``examples.diabetes:build``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: What a worker prints when the storage proxy (or the tracking server) does not answer, and
#: when it answers again; the line starts with the role's name.
WAITING, ANSWERS = "does not answer", "answers again"
STORAGE, TRACKING = "fm-optuna: the storage ", "fm-optuna: the MLflow tracking server "


def said(log: Path, role: str, phrase: str) -> int:
    """How many lines of ``log`` say ``phrase`` about ``role`` (STORAGE or TRACKING)."""
    lines = log.read_text(errors="replace").splitlines()
    return sum(line.startswith(role) and phrase in line for line in lines)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _fm_optuna(*args: str) -> list[str]:
    return [sys.executable, "-m", "fm_optuna.cli", *args]


@dataclass
class Service:
    """A role of the cluster started as a child process (its output in ``log``)."""

    command: list[str]
    log: Path
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> Service:
        with self.log.open("ab") as output:
            self.process = subprocess.Popen(
                self.command,
                stdout=output,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **self.env},
                start_new_session=True,  # a kill reaches the whole role (MLflow's workers too)
            )
        return self

    def kill(self) -> None:
        """SIGKILL the role and every process it started."""
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()


def _wait_until(ready: Any, service: Service, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert service.process is not None
        if service.process.poll() is not None:
            raise RuntimeError(f"{what} exited with {service.process.returncode}: {service.log}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start in {timeout:.0f} s: {service.log}")
        time.sleep(0.25)


def start_proxy(storage: str, port: int, log: Path, *, threads: int = 8) -> Service:
    """``fm-optuna storage-proxy`` on 127.0.0.1:``port``, once it answers."""
    command = _fm_optuna("storage-proxy", "--storage", storage, "--port", str(port))

    def served() -> int:  # a restart appends to the log of the first start
        return log.read_text(errors="replace").count("serving") if log.exists() else 0

    before = served()
    service = Service([*command, "--threads", str(threads)], log).start()
    _wait_until(lambda: served() > before, service, "the proxy", 120)
    return service


def mlflow_server_command(backend: str, artifacts: Path, port: int) -> list[str]:
    """The tracking server a cluster runs (tracking/README.md)."""
    return [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        backend,
        "--artifacts-destination",
        str(artifacts),
        "--serve-artifacts",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "2",
    ]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as response:
            return bool(response.status == 200)
    except (OSError, ValueError):
        return False


def start_mlflow_server(backend: str, artifacts: Path, port: int, log: Path) -> Service:
    """``mlflow server`` with a database backend and served artifacts, once it answers."""
    env = {"MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    service = Service(mlflow_server_command(backend, artifacts, port), log, env).start()
    url = f"http://127.0.0.1:{port}"
    _wait_until(lambda: _healthy(url), service, "the MLflow server", 300)
    return service


def write_spec(spec: Path, into: Path, *, name: str, trials: int, checkpoints: Path) -> Path:
    """The spec with the study's name, number of trials and checkpoint folder replaced."""
    import tomllib

    text = spec.read_text()
    tomllib.loads(text)  # a broken spec is the user's error, said by tomllib
    lines, in_study = [], False
    for line in text.splitlines():
        header = re.match(r"\s*\[(\w+)\]", line)
        if header:
            in_study = header[1] == "study"
            lines.append(line)
            if in_study:
                lines += [
                    f'name = "{name}"',
                    f"n_trials = {trials}",
                    f'checkpoint_dir = "{checkpoints}"',
                    "heartbeat_seconds = 2",
                ]
            continue
        key = re.match(r"\s*(\w+)\s*=", line)
        replaced = ("name", "n_trials", "checkpoint_dir", "heartbeat_seconds", "storage")
        if in_study and key and key[1] in (*replaced, "tracking_uri"):
            continue
        lines.append(line)
    into.write_text("\n".join(lines) + "\n")
    return into


def counts(workers: Sequence[Service], role: str, phrase: str) -> list[int]:
    """The distinct numbers of lines saying ``phrase`` about ``role`` among ``workers``' logs
    (``[1]``: every one said it exactly once)."""
    return sorted({said(w.log, role, phrase) for w in workers})


class ConnectionPeak:
    """The most connections to one database seen in ``pg_stat_activity`` (sampled), in all and
    by who holds them: the ``application_name`` (the proxy's is :data:`PROXY_APPLICATION`, a
    worker's own ``fm-optuna``), else the backend's type (``(autovacuum worker)``;
    ``(client backend)`` for a client that gave no name: another program on the database;
    ``(another role's backend)`` when PostgreSQL hides the type from this role). This sampler's
    own connection is not counted."""

    def __init__(self, postgres: str, every: float = 0.25) -> None:
        self.database = urllib.parse.urlsplit(postgres).path.lstrip("/")
        self.postgres, self.every, self.peak = postgres, every, 0
        #: The most connections seen at once, per holder (each holder's own peak).
        self.peaks: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @property
    def proxy(self) -> int:
        """The storage proxy's own peak."""
        from fm_optuna.study._proxy import PROXY_APPLICATION

        return self.peaks.get(PROXY_APPLICATION, 0)

    def _sample(self) -> None:
        import sqlalchemy

        engine = sqlalchemy.create_engine(self.postgres, poolclass=sqlalchemy.pool.NullPool)
        query = sqlalchemy.text(
            "SELECT coalesce(nullif(application_name, ''), "
            "'(' || coalesce(backend_type, 'another role''s backend') || ')'), "
            "count(*) FROM pg_stat_activity WHERE datname = :db AND pid <> pg_backend_pid() "
            "GROUP BY 1"
        )
        try:
            with engine.connect() as connection:
                while not self._stop.wait(self.every):
                    rows = connection.execute(query, {"db": self.database}).all()
                    connection.rollback()
                    counts = {str(who): int(n) for who, n in rows}
                    self.peak = max(self.peak, sum(counts.values()))
                    for who, n in counts.items():
                        self.peaks[who] = max(self.peaks.get(who, 0), n)
        finally:
            engine.dispose()

    def __enter__(self) -> ConnectionPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def study_figures(postgres: str, name: str, tracking: str) -> dict[str, Any]:
    """Finished trials, duplicated parameter sets and MLflow runs left RUNNING, read back."""
    import optuna
    from mlflow import MlflowClient
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.RDBStorage(postgres)
    try:
        trials = optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
    finally:
        storage.engine.dispose()
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    distinct = {tuple(sorted(t.params.items())) for t in finished}
    client = MlflowClient(tracking_uri=tracking)
    experiment = client.get_experiment_by_name(f"fm-optuna/study/{name}")
    runs = [] if experiment is None else client.search_runs([experiment.experiment_id])
    return {
        "trials": len(trials),
        "finished": len(finished),
        "failed": sum(t.state == TrialState.FAIL for t in trials),
        "running": sum(t.state == TrialState.RUNNING for t in trials),
        "distinct": len(distinct),
        "duplicates": len(finished) - len(distinct),
        "mlflow_runs": len(runs),
        "mlflow_running": sum(run.info.status == "RUNNING" for run in runs),
        "states": {t.number: t.state.name for t in trials},
    }


@dataclass
class Cluster:
    """The roles on loopback: the database (given), a proxy, a tracking server, workers."""

    postgres: str
    tracking_backend: str
    folder: Path
    proxy_port: int = field(default_factory=free_port)
    mlflow_port: int = field(default_factory=free_port)
    proxy_threads: int = 8
    proxy: Service | None = None
    mlflow: Service | None = None

    @property
    def grpc(self) -> str:
        return f"grpc://127.0.0.1:{self.proxy_port}"

    @property
    def tracking(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"

    def start_proxy(self) -> None:
        log = self.folder / "proxy.log"
        self.proxy = start_proxy(self.postgres, self.proxy_port, log, threads=self.proxy_threads)

    def start_mlflow(self) -> None:
        artifacts = self.folder / "mlartifacts"
        log = self.folder / "mlflow.log"
        self.mlflow = start_mlflow_server(self.tracking_backend, artifacts, self.mlflow_port, log)

    def workers(self, spec: Path, storage: str, count: int) -> list[Service]:
        env = {"OMP_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
        command = _fm_optuna("tune", str(spec), "--storage", storage, "--tracking-uri")
        return [
            Service(
                [*command, self.tracking, "--threads", "1"], self.folder / f"worker{i}.log", env
            ).start()
            for i in range(count)
        ]

    def close(self) -> None:
        for service in (self.proxy, self.mlflow):
            if service is not None:
                service.stop()


def wait_all(workers: Sequence[Service], timeout: float) -> list[int | None]:
    deadline = time.monotonic() + timeout
    codes: list[int | None] = []
    for worker in workers:
        assert worker.process is not None
        try:
            codes.append(worker.process.wait(timeout=max(deadline - time.monotonic(), 1)))
        except subprocess.TimeoutExpired:
            worker.kill()
            codes.append(None)
    return codes


def finished_now(postgres: str, name: str) -> int:
    import sqlalchemy

    engine = sqlalchemy.create_engine(postgres, poolclass=sqlalchemy.pool.NullPool)
    query = sqlalchemy.text(
        "SELECT count(*) FROM trials JOIN studies USING (study_id) "
        "WHERE study_name = :name AND trials.state IN ('COMPLETE', 'PRUNED')"
    )
    try:
        with engine.connect() as connection:
            return int(connection.execute(query, {"name": name}).scalar() or 0)
    except sqlalchemy.exc.ProgrammingError:  # no tables yet
        return 0
    finally:
        engine.dispose()


def measure(
    cluster: Cluster, spec: Path, *, storage: str, workers: int, trials: int, timeout: float
) -> dict[str, Any]:
    """``workers`` workers finishing ``trials`` trials of a fresh study on ``storage``."""
    kind = "grpc" if storage.startswith("grpc://") else "postgresql"
    name = f"cluster-{kind}-{workers}-{uuid.uuid4().hex[:6]}"
    run_spec = write_spec(
        spec,
        cluster.folder / f"{name}.toml",
        name=name,
        trials=trials,
        checkpoints=cluster.folder / "ckpt",
    )
    started = time.monotonic()
    with ConnectionPeak(cluster.postgres) as peak:
        codes = wait_all(cluster.workers(run_spec, storage, workers), timeout)
    seconds = time.monotonic() - started
    figures = study_figures(cluster.postgres, name, cluster.tracking)
    figures.pop("states")
    return {
        "storage": kind,
        "study": name,
        "workers": workers,
        "exit_codes": sorted(set(codes), key=str),
        "seconds": round(seconds, 1),
        **figures,
        "distinct_per_minute": round(60 * figures["distinct"] / seconds, 2),
        "peak_connections": peak.peak,
        "peak_proxy_connections": peak.proxy,
        "peak_connections_by_holder": dict(sorted(peak.peaks.items())),
    }


def kill_and_restart(
    cluster: Cluster,
    spec: Path,
    *,
    workers: int,
    trials: int,
    kill_after: int,
    down_seconds: float,
    timeout: float,
    tracking_wait: float = 60.0,
) -> dict[str, Any]:
    """Workers through the proxy and the server; once ``kill_after`` trials finished, the
    proxy and the server are SIGKILLed, the proxy restarted ``down_seconds`` later on its port,
    the server once every worker alive has said it waits for it (at most ``tracking_wait`` s
    more: a worker that made no call while it was down would have nothing to say), and the
    study must complete with everything recorded before the kill intact."""
    name = f"cluster-kill-{uuid.uuid4().hex[:6]}"
    run_spec = write_spec(
        spec,
        cluster.folder / f"{name}.toml",
        name=name,
        trials=trials,
        checkpoints=cluster.folder / "ckpt",
    )
    started = time.monotonic()
    running = cluster.workers(run_spec, cluster.grpc, workers)
    deadline = time.monotonic() + timeout
    while finished_now(cluster.postgres, name) < kill_after:
        if time.monotonic() > deadline or all(
            w.process and w.process.poll() is not None for w in running
        ):
            break
        time.sleep(0.5)
    before = study_figures(cluster.postgres, name, cluster.tracking)
    assert cluster.proxy is not None and cluster.mlflow is not None
    cluster.proxy.kill()
    cluster.mlflow.kill()
    killed = time.monotonic()
    alive = [w for w in running if w.process is not None and w.process.poll() is None]
    time.sleep(down_seconds)
    cluster.start_proxy()
    until = time.monotonic() + tracking_wait
    while time.monotonic() < until and not all(
        said(w.log, TRACKING, WAITING) or (w.process and w.process.poll() is not None)
        for w in alive
    ):
        time.sleep(0.5)
    cluster.start_mlflow()
    tracking_down = time.monotonic() - killed
    # Alive through the whole outage: the workers that had to say it.
    alive = [w for w in alive if w.process is not None and w.process.poll() is None]
    codes = wait_all(running, max(deadline - time.monotonic(), 1))
    after = study_figures(cluster.postgres, name, cluster.tracking)
    finished_before = {n: s for n, s in before["states"].items() if s in ("COMPLETE", "PRUNED")}
    lost = [n for n, s in finished_before.items() if after["states"].get(n) != s]
    after.pop("states")
    return {
        "study": name,
        "workers": workers,
        "exit_codes": sorted(set(codes), key=str),
        "seconds": round(time.monotonic() - started, 1),
        "finished_before_kill": len(finished_before),
        "lost_after_restart": lost,
        "tracking_down_seconds": round(tracking_down, 1),
        "workers_alive_through_the_outage": len(alive),
        # Sets of per-worker counts: [1] means every worker said it exactly once.
        "waiting_lines_per_worker": counts(running, STORAGE, WAITING),
        "tracking_waiting_lines_per_worker": counts(alive, TRACKING, WAITING),
        "tracking_back_lines_per_worker": counts(alive, TRACKING, ANSWERS),
        **after,
    }


def run(
    spec: Path,
    postgres: str,
    tracking_backend: str,
    *,
    workers: int,
    trials: int,
    kill: bool,
    timeout: float,
    folder: Path,
    measured: bool = True,
    direct: bool = True,
    proxy_threads: int = 8,
) -> dict[str, Any]:
    cluster = Cluster(postgres, tracking_backend, folder, proxy_threads=proxy_threads)
    report: dict[str, Any] = {
        "spec": str(spec),
        "workers": workers,
        "trials": trials,
        "proxy_threads": proxy_threads,
    }
    try:
        cluster.start_mlflow()
        if measured and direct:
            report["postgresql"] = measure(
                cluster, spec, storage=postgres, workers=workers, trials=trials, timeout=timeout
            )
        cluster.start_proxy()
        if measured:
            report["grpc"] = measure(
                cluster, spec, storage=cluster.grpc, workers=workers, trials=trials, timeout=timeout
            )
        if kill:
            report["kill_and_restart"] = kill_and_restart(
                cluster,
                spec,
                workers=workers,
                trials=trials,
                kill_after=max(trials // 4, 1),
                down_seconds=10,
                timeout=timeout,
            )
    finally:
        cluster.close()
    return report


def _masked(report: dict[str, Any]) -> dict[str, Any]:
    from fm_optuna.tracking.uris import mask_uri

    return json.loads(mask_uri(json.dumps(report)))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fm_optuna.experiments._bench_cluster",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("spec", type=Path, help="a study file whose trials take a few seconds")
    parser.add_argument("--postgres", required=True, help="the PostgreSQL database of the study")
    parser.add_argument(
        "--tracking-backend",
        default=None,
        help="the tracking server's database (default: database fm_optuna_cluster_mlflow on "
        "the same server, created if missing)",
    )
    parser.add_argument("--workers", type=int, default=16, help="worker processes (default: 16)")
    parser.add_argument("--trials", type=int, default=48, help="trials of each study")
    parser.add_argument("--no-kill", action="store_true", help="skip the kill-and-restart part")
    parser.add_argument("--kill-only", action="store_true", help="only the kill-and-restart part")
    parser.add_argument(
        "--proxy-only",
        action="store_true",
        help="measure through the gRPC proxy only (skip PostgreSQL directly)",
    )
    parser.add_argument(
        "--proxy-threads",
        type=int,
        default=8,
        help="the proxy's threads, and its most database connections (default: 8)",
    )
    parser.add_argument("--keep", type=Path, default=None, help="keep the logs in this folder")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per study at most")
    args = parser.parse_args(argv)
    if args.workers < 1 or args.trials < 1 or args.proxy_threads < 1:
        parser.error("--workers, --trials and --proxy-threads should be positive integers")
    backend = args.tracking_backend or own_database(args.postgres, "fm_optuna_cluster_mlflow")
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
    with (
        contextlib.nullcontext(str(args.keep))
        if args.keep is not None
        else tempfile.TemporaryDirectory(prefix="fm-optuna-cluster-")
    ) as folder:
        report = run(
            args.spec,
            args.postgres,
            backend,
            workers=args.workers,
            trials=args.trials,
            kill=not args.no_kill,
            measured=not args.kill_only,
            direct=not args.proxy_only,
            proxy_threads=args.proxy_threads,
            timeout=args.timeout,
            folder=Path(folder),
        )
    print(json.dumps(_masked(report), indent=2))
    return 0


def own_database(postgres: str, name: str) -> str:
    """``postgres`` with database ``name``, created if missing (MLflow and Optuna would both
    claim the ``alembic_version`` table of one database)."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(postgres, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            query = sqlalchemy.text("SELECT 1 FROM pg_database WHERE datname = :name")
            if not connection.execute(query, {"name": name}).scalar():
                connection.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    finally:
        engine.dispose()
    parts = urllib.parse.urlsplit(postgres)
    return urllib.parse.urlunsplit(parts._replace(path=f"/{name}"))


if __name__ == "__main__":
    sys.exit(main())
