"""Opening an MLflow tracking store, checked up front so a bad store fails before any training."""

from __future__ import annotations

import datetime
import functools
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fm_optuna.errors import ConfigError
from fm_optuna.study._processes import process_is_gone
from fm_optuna.study._storages import check_database, one_process_at_a_time
from fm_optuna.tracking.server_watch import WatchedClient, health, watch_for
from fm_optuna.tracking.uris import (
    absolute_uri,
    artifact_root,
    is_database,
    is_server,
    mask_uri,
    redact,
    resolve_tracking_uri,
    scheme,
    sqlite_path,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient

logger = logging.getLogger("fm_optuna.tracking")

#: Seconds to wait for a database or server when opening the store (MLflow itself would retry a
#: dead database for minutes before giving up).
CONNECT_TIMEOUT = 5
#: Tags naming the process that owns a run, so a later invocation can end the runs of a dead one.
HOST_TAG, PID_TAG = "fm_optuna.host", "fm_optuna.pid"
OPENED_TAG = "fm_optuna.last_opened"
# MLflow writes a tag as look-up-then-insert: two workers probing a tag that does not exist
# yet both insert, and the second one's insert hits the key the first one just wrote.
_CONCURRENT_INSERT = re.compile(r"duplicate key|unique constraint|integrityerror", re.IGNORECASE)


def owner_tags() -> dict[str, str]:
    """This process as the owner of the runs it opens (see :func:`end_orphaned_runs`)."""
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())}


def quiet_mlflow_logging() -> None:
    """MLflow's own log lines and tracebacks never reach the user's terminal: what matters is
    reported by fm-optuna in one line (a store error) or in its warnings."""
    for name in ("mlflow", "alembic", "huey"):
        logger_ = logging.getLogger(name)
        logger_.handlers = [logging.NullHandler()]
        logger_.propagate = False


@dataclass
class _Opened:
    """What opening a store yields: the client and the experiment's id and artifact root."""

    client: MlflowClient
    experiment_id: str
    artifact_location: str


class TrackingStore:
    """A store and the experiment runs go to: open, or a new one still being prepared.

    A brand-new database takes MLflow's migrations (seconds to tens of seconds) before its first
    write; :func:`open_store` with ``background=True`` returns at once and prepares it while
    training starts. :attr:`client`, :attr:`experiment_id` and :attr:`artifact_location` wait
    for the preparation (and raise its error); :attr:`is_open` asks without waiting.

    Attributes:
        uri: The tracking URI as given (may hold a password: show :attr:`display_uri` instead).
        experiment_name: Its name, e.g. ``fm-optuna/digits-uci``.
        opening_seconds: How long opening took (a new store's preparation included).
    """

    def __init__(self, uri: str, experiment_name: str, opened: _Opened | None = None) -> None:
        self.uri = uri
        self.experiment_name = experiment_name
        self.opening_seconds = 0.0
        self._opened = opened
        self._error: BaseException | None = None
        self._done = threading.Event()
        if opened is not None:
            self._done.set()

    def prepare(self, open_: Callable[[], _Opened]) -> None:
        """Run ``open_`` in a background thread; the properties below wait for it."""
        started = time.perf_counter()

        def run() -> None:
            try:
                self._opened = open_()
            except BaseException as error:  # raised where the store is first used
                self._error = error
            finally:
                self.opening_seconds = time.perf_counter() - started
                self._done.set()

        threading.Thread(target=run, name="fm-optuna-store", daemon=True).start()

    @property
    def is_open(self) -> bool:
        """Whether opening has ended (successfully or not); never waits."""
        return self._done.is_set()

    def _wait(self) -> _Opened:
        self._done.wait()
        if self._opened is None:
            raise self._error or _fail(self.uri, "its preparation did not finish")
        return self._opened

    @property
    def client(self) -> MlflowClient:
        """The MLflow client every log call goes through."""
        return self._wait().client

    @client.setter
    def client(self, value: MlflowClient) -> None:
        self._wait().client = value

    @property
    def experiment_id(self) -> str:
        return self._wait().experiment_id

    @property
    def artifact_location(self) -> str:
        return self._wait().artifact_location

    @property
    def display_uri(self) -> str:
        return mask_uri(self.uri)

    def redact(self, text: str) -> str:
        return redact(text, self.uri)

    def error_line(self, error: BaseException) -> str:
        """``error`` as one line (its type and first line), this store's password removed."""
        return error_line(error, self.uri)


def default_experiment_name(benchmark: str, target: str) -> str:
    return f"fm-optuna/{benchmark}-{target}"


def error_line(error: BaseException, uri: str) -> str:
    """``error`` as one line (its type and first line), ``uri``'s password removed."""
    lines = str(error).strip().splitlines()
    message = lines[0] if lines else ""
    return redact(f"{type(error).__name__}: {message}" if message else type(error).__name__, uri)


def _fail(uri: str, why: str) -> ConfigError:
    return ConfigError(f"Cannot open the MLflow tracking store `{mask_uri(uri)}`: {why}")


def _check_database(uri: str) -> None:
    """Connect once with a short timeout; SQLite gets its folder created."""
    import sqlalchemy

    path = sqlite_path(uri)
    if path is not None:
        # A read-only file or folder is one line here, before MLflow touches it.
        check_database(uri, parameter="tracking_uri", what="a writable MLflow tracking store")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise _fail(uri, f"cannot create the folder {path.parent} ({error.strerror})") from None
    connect_args = {"connect_timeout": CONNECT_TIMEOUT} if scheme(uri) != "sqlite" else {}
    try:
        engine = sqlalchemy.create_engine(uri, connect_args=connect_args)
        try:
            with engine.connect():
                pass
        finally:
            engine.dispose()
    except Exception as error:  # driver missing, refused, bad password, unwritable file, ...
        raise _fail(uri, error_line(error, uri)) from None


def _check_server(uri: str) -> None:
    reason = health(uri, timeout=CONNECT_TIMEOUT)
    if reason is not None:
        answered = reason.startswith("the server answered")
        raise _fail(uri, reason if answered else f"no MLflow server answers ({reason})")


def _slug(name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", name).strip("_") or "experiment"


def _client(uri: str, attempts: int = 5) -> MlflowClient:
    """An MLflow client whose store is ready, even if another worker is creating its tables.

    Several workers of one shared study may open a brand-new database at the same moment. On
    SQLite they take turns (a file lock); on a server all but one fail on MLflow's table creation
    (unique violations) while the first is still migrating, and wait and try again.
    """
    from mlflow import MlflowClient

    quiet_mlflow_logging()  # after MLflow's import, which installs its own stderr handler
    for attempt in range(attempts):
        try:
            with one_process_at_a_time(uri):
                client: Any = MlflowClient(tracking_uri=uri)
                if is_server(uri):  # a server that stops answering is said, not waited in silence
                    client = WatchedClient(client, watch_for(uri))
                client.search_experiments(max_results=1)  # forces the store (and its tables) now
            return client
        except Exception as error:
            racing = any(
                sign in str(error)
                for sign in ("already exists", "UniqueViolation", "IntegrityError")
            )
            if not racing or attempt == attempts - 1:
                raise
            time.sleep(1.0 + attempt)
    raise AssertionError("unreachable")


def open_store(
    uri: str | None = None, *, experiment: str, background: bool = False
) -> TrackingStore:
    """Open (creating on first use) the store and the experiment; raise one-line errors.

    Args:
        uri: A tracking URI; ``None`` means ``MLFLOW_TRACKING_URI`` or the default
            ``sqlite:///tracking/mlflow.db``.
        experiment: The experiment's name; created when missing, with its artifacts beside a
            SQLite database (or under ``FM_OPTUNA_ARTIFACT_ROOT``).
        background: A database without MLflow's tables yet is prepared in the background (its
            migrations in a child process, see :func:`_migrate_apart`) and the store returned at
            once; the cheap checks (the URI, a writable file and folder, a connection) are made
            here first either way.

    Raises:
        ConfigError: The store cannot be reached or written, or the experiment is deleted.

    Example:
        >>> store = open_store("sqlite:///tmp/doc/mlflow.db", experiment="demo")  # doctest: +SKIP
    """
    started = time.perf_counter()
    uri = absolute_uri(resolve_tracking_uri(uri))
    _check_reachable(uri)
    if not experiment.strip():
        raise ConfigError("Parameter `experiment` should be a non-empty name. Found `''`.")
    if background and is_database(uri) and not _has_mlflow_tables(uri):
        store = TrackingStore(uri, experiment)
        store.prepare(functools.partial(_open_new, uri, experiment))
        return store
    store = TrackingStore(uri, experiment, _open(uri, experiment))
    end_orphaned_runs(store)
    store.opening_seconds = time.perf_counter() - started
    return store


def _check_reachable(uri: str) -> None:
    if is_server(uri):
        _check_server(uri)
    elif is_database(uri):
        _check_database(uri)
    else:
        raise ConfigError(
            f"Parameter `tracking_uri` should be a sqlite:///, postgresql://, mysql:// or "
            f"http(s):// URI. Found `tracking_uri = {mask_uri(uri)}`."
        )


def _open(uri: str, experiment: str) -> _Opened:
    """The client, the experiment (created when missing) and one probing write."""
    try:
        with warnings.catch_warnings():
            # mlflow 3.17's SQL store maps a relationship with SQLAlchemy 2's deprecated
            # `noload`; the warning fires once per process, here, and no user can act on it.
            warnings.filterwarnings("ignore", message="The ``noload`` loader strategy")
            client = _client(uri)
            found = client.get_experiment_by_name(experiment)
        if found is None:
            found = _create_experiment(client, uri, experiment)
    except Exception as error:
        raise _fail(uri, error_line(error, uri)) from None
    if found.lifecycle_stage != "active":
        raise ConfigError(
            f"Parameter `experiment` should name an active experiment; `{experiment}` is "
            f"deleted in `{mask_uri(uri)}` (restore it in the MLflow UI or choose another name)."
        )
    _probe_writes(client, found.experiment_id, uri)
    logger.debug("tracking to %s, experiment %s", mask_uri(uri), experiment)
    return _Opened(client, found.experiment_id, found.artifact_location)


def _create_experiment(client: MlflowClient, uri: str, experiment: str) -> Any:
    root = artifact_root(uri)
    location = None if root is None else f"{root.rstrip('/')}/{_slug(experiment)}"
    try:
        experiment_id = client.create_experiment(
            experiment,
            artifact_location=location,
            # The MLflow 3 UI then opens it as model training rather than GenAI.
            # The probe's tag exists from the start, so probes update rather than insert.
            tags={"mlflow.experimentKind": "custom_model_development", OPENED_TAG: _now()},
        )
        return client.get_experiment(experiment_id)
    except Exception:
        # Workers of one shared study start together: another may have created it between
        # our look-up and our create. Only a still-missing experiment is an error.
        found = client.get_experiment_by_name(experiment)
        if found is None:
            raise
        return found


def _has_mlflow_tables(uri: str) -> bool:
    """Whether the database has MLflow's schema already (``False``: migrations to come)."""
    import sqlalchemy

    path = sqlite_path(uri)
    if path is not None and (not path.exists() or path.stat().st_size == 0):
        return False
    connect_args = {"connect_timeout": CONNECT_TIMEOUT} if scheme(uri) != "sqlite" else {}
    engine = sqlalchemy.create_engine(uri, connect_args=connect_args)
    try:
        return sqlalchemy.inspect(engine).has_table("experiments")
    except Exception:  # unsure: open it the usual way, in the foreground
        return True
    finally:
        engine.dispose()


def _open_new(uri: str, experiment: str) -> _Opened:
    """A new store: migrated apart, then opened here as any other (nothing to end in it)."""
    with one_process_at_a_time(uri):
        _migrate_apart(uri)
    return _open(uri, experiment)


#: What the child process runs: MLflow creates its tables when its store is first used.
_MIGRATE = """
import logging, os, warnings
warnings.simplefilter("ignore")
logging.disable(logging.CRITICAL)
from mlflow import MlflowClient
MlflowClient(tracking_uri=os.environ["FM_OPTUNA_NEW_STORE"]).search_experiments(max_results=1)
"""


def _migrate_apart(uri: str) -> None:
    """Run MLflow's migrations of a new database in a child process.

    Why not a thread: the migrations are Python (alembic, SQLAlchemy) holding the GIL, and a
    thread doing them slowed a digits training thread by 6.8 s for a 9.0 s migration (measured
    2026-12-02 on 2 cores); a process uses the other core. Its own session keeps a Ctrl-C meant
    for the command from stopping a migration half-way. If it fails (another worker migrating
    the same server database, say), :func:`_open` migrates in-process with its retries and
    its one-line errors, as without ``background``.
    """
    env = {**os.environ, "FM_OPTUNA_NEW_STORE": uri, "MLFLOW_DISABLE_TELEMETRY": "true"}
    try:
        subprocess.run(
            [sys.executable, "-c", _MIGRATE],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            check=False,
        )
    except OSError as error:  # no interpreter to start: the in-process opening does it all
        logger.debug("could not migrate %s apart: %s", mask_uri(uri), error)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def _probe_writes(client: MlflowClient, experiment_id: str, uri: str, attempts: int = 4) -> None:
    """One real write now: a store that can be read but not written (a read-only file, a user
    without INSERT) is one line at start, not lost tracking and tracebacks mid-run.

    Another worker writing the same tag at the same moment is not a fault: the write is retried.
    """
    for attempt in range(attempts):
        try:
            client.set_experiment_tag(experiment_id, OPENED_TAG, _now())
            return
        except Exception as error:
            if attempt + 1 == attempts or not _CONCURRENT_INSERT.search(str(error)):
                raise _fail(uri, f"it cannot be written ({error_line(error, uri)})") from None
            time.sleep(0.05 * (attempt + 1))


def end_orphaned_runs(store: TrackingStore) -> int:
    """End (KILLED) the runs left RUNNING by a dead fm-optuna process on this machine.

    A killed ``fm-optuna run`` (or worker) cannot end its own runs; the next invocation that
    opens the experiment does. Runs of live processes, and of other machines (whose processes
    cannot be checked from here), are left alone. Best effort: returns how many were ended.
    """
    host = socket.gethostname().replace("'", "")
    try:
        runs = store.client.search_runs(
            [store.experiment_id],
            f"attributes.status = 'RUNNING' and tags.`{HOST_TAG}` = '{host}'",
            max_results=1000,
        )
    except Exception as error:
        logger.debug("could not look for orphaned runs: %s", store.redact(str(error)))
        return 0
    ended = 0
    for run in runs:
        pid = run.data.tags.get(PID_TAG, "")
        if not pid.isdigit() or not process_is_gone(int(pid)):
            continue
        try:
            store.client.set_tag(run.info.run_id, "fm_optuna.status", "KILLED")
            store.client.set_terminated(run.info.run_id, status="KILLED")
            ended += 1
        except Exception as error:
            logger.debug("could not end run %s: %s", run.info.run_id, store.redact(str(error)))
    return ended
