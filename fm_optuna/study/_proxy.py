"""``fm-optuna storage-proxy``: Optuna's gRPC storage proxy served in front of an RDB storage,
with one pool of database connections for every worker (see :mod:`fm_optuna.study._grpc`)."""

from __future__ import annotations

import time
from collections.abc import Callable

from optuna.distributions import BaseDistribution
from optuna.storages import RDBStorage
from optuna.storages._cached_storage import _CachedStorage
from optuna.storages._rdb import models
from optuna.storages._rdb.storage import _create_scoped_session

from fm_optuna.errors import ConfigError, invalid
from fm_optuna.study._grpc import is_grpc
from fm_optuna.study._storages import (
    check_database,
    named_connections,
    one_process_at_a_time,
)
from fm_optuna.tracking.uris import is_database, mask_uri, redact

#: Threads serving the proxy's requests, and as many database connections (its pool).
PROXY_THREADS = 8
#: The ``application_name`` of the proxy's PostgreSQL connections (``pg_stat_activity``).
PROXY_APPLICATION = "fm-optuna storage-proxy"


class RestartSafeCache(_CachedStorage):
    """Optuna's cache of an RDB storage (what ``run_grpc_proxy_server`` asks for), safe for a
    proxy that starts while workers have trials under way.

    Optuna's ``_CachedStorage.set_trial_param`` looks the trial up in its cache only: a trial
    created through the previous proxy process (killed, restarted) is not there, and the worker
    suggesting its next parameter got ``KeyError`` and stopped with a traceback (seen
    2026-12-03 in the kill-and-restart test). On such a miss this cache first reads the
    trial's study from the database, as its first ``get_all_trials`` would have.
    """

    def set_trial_param(
        self,
        trial_id: int,
        param_name: str,
        param_value_internal: float,
        distribution: BaseDistribution,
    ) -> None:
        with self._lock:
            known = trial_id in self._trial_id_to_study_id_and_number
        if not known:
            study_id = _study_of_trial(self._backend, trial_id)
            if study_id is not None:
                self._read_trials_from_remote_storage(study_id)
        super().set_trial_param(trial_id, param_name, param_value_internal, distribution)


def _study_of_trial(rdb: RDBStorage, trial_id: int) -> int | None:
    """The study of ``trial_id`` in the database (``None``: no such trial, which the caller's
    lookup then reports as Optuna does)."""
    try:
        with _create_scoped_session(rdb.scoped_session) as session:
            return int(models.TrialModel.find_or_raise_by_id(trial_id, session).study_id)
    except KeyError:
        return None


def serve_proxy(
    storage: str,
    *,
    host: str = "127.0.0.1",
    port: int = 13000,
    threads: int = PROXY_THREADS,
    announce: Callable[[str], None] = print,
) -> None:
    """Serve Optuna's gRPC storage proxy for the RDB storage ``storage`` until interrupted.

    The proxy holds one cached storage with a pool of at most ``threads`` database connections
    (one per serving thread), however many workers connect. Stopped by a KeyboardInterrupt
    (SIGINT, or SIGTERM through the command line's handler): requests in flight get 2 s.
    """
    from concurrent.futures import ThreadPoolExecutor

    if is_grpc(storage) or not is_database(storage):
        raise invalid(
            "storage",
            mask_uri(storage),
            "an RDB storage URL for the proxy to serve (postgresql://user:password@host/db, "
            "mysql://..., sqlite:///path.db)",
        )
    if threads < 1:
        raise invalid("threads", threads, "a positive integer")
    if not 0 <= port <= 65535:
        raise invalid("port", port, "a TCP port, 0 to 65535 (0: any free one)")
    check_database(storage, parameter="storage", what="a reachable Optuna storage URL")
    # One connection per serving thread and never more (no overflow): the proxy's share of the
    # database is `threads`, however many workers connect.
    engine = (
        None
        if storage.startswith("sqlite")
        else {
            "pool_size": threads,
            "max_overflow": 0,
            "pool_pre_ping": True,
            **named_connections(storage, PROXY_APPLICATION),
        }
    )
    try:
        with one_process_at_a_time(storage):
            rdb = RDBStorage(storage, engine_kwargs=engine)
    except Exception as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(
            f"Parameter `storage` should be a reachable Optuna storage URL. "
            f"Found `storage = {mask_uri(storage)}` ({redact(first, storage)})."
        ) from None
    import grpc
    from optuna.storages._grpc.auto_generated import api_pb2_grpc
    from optuna.storages._grpc.servicer import OptunaStorageProxyService

    cached = RestartSafeCache(rdb)
    pool = ThreadPoolExecutor(max_workers=threads)
    # What optuna.storages.run_grpc_proxy_server does, with the bound port known (port 0).
    server = grpc.server(pool)
    api_pb2_grpc.add_StorageServiceServicer_to_server(OptunaStorageProxyService(cached), server)
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError:  # the port is taken, or the host is not an address of this machine
        pool.shutdown(wait=False)
        raise invalid("port", port, f"a free port on {host}") from None
    server.start()
    announce(
        f"fm-optuna storage-proxy: serving {mask_uri(storage)} at grpc://{host}:{bound} "
        f"({threads} threads, at most {threads} database connections); workers use "
        f"--storage grpc://{host}:{bound}; Ctrl-C or SIGTERM stops it"
    )
    try:
        while True:  # grpc's wait_for_termination swallows the signal's KeyboardInterrupt
            time.sleep(3600)
    finally:
        server.stop(grace=2.0).wait(5.0)
        pool.shutdown(wait=False, cancel_futures=True)
        rdb.remove_session()
        rdb.engine.dispose()
