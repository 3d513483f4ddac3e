"""Checking a database URL (Optuna storage, MLflow store) before anything is created in it.

A command checks every store it will use first and creates them only once all checks pass, so
a mistake in one of them leaves no new file behind.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fm_optuna.errors import ConfigError
from fm_optuna.tracking.uris import mask_uri, redact

#: Seconds to wait for a database server.
CONNECT_TIMEOUT = 5
#: The first bytes of every SQLite database file.
SQLITE_HEADER = b"SQLite format 3\x00"


def _masked(url: str) -> str:
    return mask_uri(url)


def named_connections(url: str, name: str) -> dict[str, Any]:
    """Engine arguments that give a PostgreSQL URL's connections the ``application_name``
    ``name`` (what ``pg_stat_activity`` shows, so a database's connections can be told apart by
    role); nothing for other databases or a URL that names its own.

    Example:
        >>> named_connections("postgresql://u:p@db/optuna", "fm-optuna")
        {'connect_args': {'application_name': 'fm-optuna'}}
        >>> named_connections("sqlite:///optuna.db", "fm-optuna")
        {}
    """
    if not url.lower().startswith("postgresql") or "application_name=" in url:
        return {}
    return {"connect_args": {"application_name": name}}


def sqlite_file(url: str) -> Path | None:
    """The file of a ``sqlite:///`` URL (``None`` for other URLs and in-memory databases)."""
    if not url.startswith("sqlite:///"):
        return None
    path = url.removeprefix("sqlite:///").split("?", 1)[0]
    return None if not path or path == ":memory:" else Path(path)


@contextlib.contextmanager
def one_process_at_a_time(url: str) -> Iterator[None]:
    """Holds an exclusive lock on ``<file>.lock`` beside a SQLite database while the caller
    creates or opens it (a no-op for other URLs).

    Two workers started together on a new SQLite store would otherwise both create its tables:
    MLflow's migrations then collide and leave a half-migrated file (an ``_alembic_tmp_*`` table)
    that no later command can open. A server database needs no lock: its DDL is transactional
    and the loser's unique violation is retried by the caller.
    """
    path = sqlite_file(url)
    if path is None:
        yield
        return
    import fcntl  # POSIX, as the machines sharing a SQLite file are

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _writable_folder(folder: Path) -> bool:
    while not folder.exists():  # the nearest folder that exists is where ours will be created
        if folder.parent == folder:
            return False
        folder = folder.parent
    return folder.is_dir() and os.access(folder, os.W_OK | os.X_OK)


def check_database(url: str, *, parameter: str, what: str) -> None:
    """Raise a one-line ConfigError unless ``url`` can be opened for writing; create nothing.

    SQLite: the file (if it exists) and its folder must be writable (SQLite writes its journal
    beside the file). ``grpc://``: a storage proxy answers within a few seconds. Other
    databases: one connection with a short timeout.
    """
    path = sqlite_file(url)
    if path is not None:
        if path.exists() and (path.is_dir() or not os.access(path, os.R_OK | os.W_OK)):
            raise _fail(url, parameter, what, f"the file {path} is not writable")
        if path.is_file() and not _is_sqlite(path):
            raise _fail(url, parameter, what, f"the file {path} is not an SQLite database")
        if not _writable_folder(path.parent):
            raise _fail(url, parameter, what, f"cannot write in the folder {path.parent}")
        return
    if url.lower().startswith("grpc://"):
        from fm_optuna.study._grpc import check_grpc

        check_grpc(url)  # bounded: an unreachable proxy is one line, not a hang
        return
    if url.startswith("sqlite"):
        if url.split("?", 1)[0] not in ("sqlite://", "sqlite:///:memory:"):
            raise _fail(
                url,
                parameter,
                what,
                "a SQLite URL has three slashes before a relative path, sqlite:///tracking/x.db, "
                "and four before an absolute one",
            )
        return
    import sqlalchemy

    try:
        sqlalchemy.engine.make_url(url)
    except Exception as error:  # not a URL at all: no driver to ask
        raise _fail(url, parameter, what, redact(str(error).splitlines()[0], url)) from None

    try:
        engine = sqlalchemy.create_engine(url, connect_args={"connect_timeout": CONNECT_TIMEOUT})
        try:
            with engine.connect():
                pass
        finally:
            engine.dispose()
    except Exception as error:  # driver missing, refused, bad password, ...
        lines = str(error).strip().splitlines()
        why = redact(lines[0], url) if lines else type(error).__name__
        raise _fail(url, parameter, what, why) from None


def _is_sqlite(path: Path) -> bool:
    """An empty file (SQLite makes one a database) or one with SQLite's header."""
    try:
        with open(path, "rb") as file:
            head = file.read(len(SQLITE_HEADER))
    except OSError:
        return True  # unreadable: the writability check words it
    return not head or head == SQLITE_HEADER


def _fail(url: str, parameter: str, what: str, why: str) -> ConfigError:
    return ConfigError(
        f"Parameter `{parameter}` should be {what}. Found `{parameter} = {_masked(url)}` "
        f"({_masked(why)})."
    )
