"""Tracking URIs: which store to use, where its artifacts go, and how to show a URI safely.

Nothing here imports MLflow, so the command line can resolve and mask URIs (``fm-optuna ui``)
without paying for MLflow's import.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path
from urllib.parse import unquote, urlsplit

#: The embedded store a newcomer gets: no server, created on first use, git-ignored.
DEFAULT_TRACKING_URI = "sqlite:///tracking/mlflow.db"
#: Where artifacts of experiments created against a database store go, unless overridden.
DEFAULT_ARTIFACT_ROOT = Path("tracking") / "mlartifacts"
#: Overrides the artifact root for database stores (a shared folder, an ``s3://`` bucket, ...).
ARTIFACT_ROOT_ENV = "FM_OPTUNA_ARTIFACT_ROOT"

# Up to the next blank or quote: a password may hold raw '/' or '@' that should be escaped.
_URI = re.compile(r"(?P<scheme>[A-Za-z][\w+.-]*://)(?P<rest>[^\s'\"`]*)")
# A credential-carrying parameter of a URL's query or a driver's key=value string, whatever its
# prefix (password, sslpassword, passwd, pwd, auth_token, client_secret, api_key, ...); a quoted
# value up to its closing quote.
_QUERY_SECRET = re.compile(
    r"(?i)\b(?P<key>[\w-]*?(?:password|passwd|pwd|secret|token|api[_-]?key|access[_-]?key"
    r"|credentials?))(?P<eq>=|%3D)(?P<value>'[^']*'|\"[^\"]*\"|[^&;\s'\"`]*)"
)


def resolve_tracking_uri(uri: str | None = None) -> str:
    """``uri`` if given, else ``MLFLOW_TRACKING_URI``, else :data:`DEFAULT_TRACKING_URI`."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def scheme(uri: str) -> str:
    """The URI's scheme without its driver (``postgresql+psycopg2`` → ``postgresql``)."""
    return urlsplit(uri).scheme.split("+", 1)[0].lower()


def is_server(uri: str) -> bool:
    return scheme(uri) in ("http", "https")


def is_database(uri: str) -> bool:
    return scheme(uri) in ("sqlite", "postgresql", "mysql", "mssql")


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (relative paths are relative to the cwd)."""
    if scheme(uri) != "sqlite":
        return None
    # sqlite:///relative/path and sqlite:////absolute/path (SQLAlchemy's convention).
    path = uri.split(":///", 1)[1] if ":///" in uri else ""
    path = path.split("?", 1)[0]
    if not path or path == ":memory:":
        return None
    return Path(path)


def absolute_uri(uri: str) -> str:
    """The same store with a relative SQLite path made absolute (immune to later ``chdir``)."""
    path = sqlite_path(uri)
    if path is None or path.is_absolute():
        return uri
    query = "?" + uri.split("?", 1)[1] if "?" in uri else ""
    return f"sqlite:///{path.resolve()}{query}"


def artifact_root(uri: str) -> str | None:
    """Where new experiments keep their artifacts (``None``: a server decides).

    A SQLite store keeps them in ``mlartifacts/`` beside the database file, so the default store
    puts everything under ``tracking/`` (MLflow would otherwise write to ``./mlruns``).
    ``FM_OPTUNA_ARTIFACT_ROOT`` overrides it for any database store, e.g. a folder every
    machine of a team mounts.
    """
    if is_server(uri):
        return None
    override = os.environ.get(ARTIFACT_ROOT_ENV)
    if override:
        return override if "://" in override else Path(override).resolve().as_uri()
    path = sqlite_path(uri)
    root = path.resolve().parent / "mlartifacts" if path is not None else DEFAULT_ARTIFACT_ROOT
    return root.resolve().as_uri()


def _secrets(uri: str) -> set[str]:
    """The secrets of ``uri`` in every form a driver may quote them: the user info's password
    (decoded or not, and each part between raw '@', as a parser splitting at the first one
    sees them) and the values of credential-carrying query parameters."""
    found: set[str] = set()
    try:
        password = urlsplit(uri).password
    except ValueError:
        password = None
    for value in [password, *(m["value"] for m in _QUERY_SECRET.finditer(uri))]:
        if not value:
            continue
        value = value.strip("'\"")
        for form in (value, unquote(value)):
            found.add(form)
            found.update(form.split("@"))
    return {form for form in found if len(form) >= 3}


def mask_uri(text: str) -> str:
    """Hide every secret in ``text``, the one masking function of both stores: the password of
    every URI's user info (``user:secret@host`` → ``user:***@host``, reserved characters such as
    ``@`` or ``/`` in it included), a token as the whole user info of an http(s) URI, and every
    credential-carrying parameter (``?password=``, ``sslpassword=``, ``passwd=``, ``token=``,
    ``api_key=``, ... in a query string or a driver's ``key=value`` text).

    Example:
        >>> mask_uri("postgresql://ana:s3cret@db:5432/mlflow")
        'postgresql://ana:***@db:5432/mlflow'
        >>> mask_uri("postgresql://db/mlflow?user=ana&password=s3cret")
        'postgresql://db/mlflow?user=ana&password=***'
    """

    def hide(match: re.Match[str]) -> str:
        rest = match["rest"]
        # The user info ends at the last '@' (a raw '@', '/', '?' or '#' in a password
        # included); masking too much is harmless, too little is not.
        if "@" not in rest:
            return match[0]
        userinfo, host = rest.rsplit("@", 1)
        if ":" in userinfo:
            return f"{match['scheme']}{userinfo.split(':', 1)[0]}:***@{host}"
        if match["scheme"].lower().startswith("http"):
            return f"{match['scheme']}***@{host}"  # https://TOKEN@host
        return match[0]

    return _QUERY_SECRET.sub(r"\g<key>\g<eq>***", _URI.sub(hide, text))


def redact(text: str, *uris: str) -> str:
    """:func:`mask_uri`, and every password of ``uris`` removed wherever else it appears.

    Error messages from database drivers may quote a password outside any URI.
    """
    text = mask_uri(text)
    for uri in uris:
        # Longest first; masking a 1-2 character part would shred the text.
        for form in sorted(_secrets(uri), key=len, reverse=True):
            text = text.replace(form, "***")
    return text


def browse_command(uri: str, experiment: str | None = None) -> str:
    """What to type, from any folder, to browse the store ``uri`` (password masked).

    Example:
        >>> browse_command("sqlite:////data/mlflow.db", "fm-optuna/digits-uci")
        'fm-optuna ui --tracking-uri sqlite:////data/mlflow.db --experiment fm-optuna/digits-uci'
        >>> browse_command("http://127.0.0.1:5000")
        'open http://127.0.0.1:5000 in a browser'
    """
    uri = absolute_uri(uri)
    if is_server(uri):
        return f"open {mask_uri(uri)} in a browser"
    command = f"fm-optuna ui --tracking-uri {shlex.quote(mask_uri(uri))}"
    return command if experiment is None else f"{command} --experiment {shlex.quote(experiment)}"
