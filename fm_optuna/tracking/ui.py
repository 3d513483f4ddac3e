"""``fm-optuna ui``: the MLflow UI for a tracking store, on 127.0.0.1 only.

The server is MLflow's own (``python -m mlflow server --app-name fm-optuna``: MLflow's app plus
the start page of :mod:`fm_optuna.tracking.ui_app`) in a child process of its own session, so
stopping it reaches every worker it spawned. Every link it prints goes through the start page,
so a fresh browser stays in the model-training view whatever it clicks next. Its output is
passed through with passwords masked, and the database URI travels in the environment rather
than on the command line, where any user of the machine could read it with ``ps``.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import webbrowser
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import IO, Any

from fm_optuna.errors import ConfigError, invalid
from fm_optuna.tracking.ui_app import APP_NAME, START_PATH
from fm_optuna.tracking.uris import (
    absolute_uri,
    artifact_root,
    is_database,
    is_server,
    mask_uri,
    redact,
    resolve_tracking_uri,
    sqlite_path,
)

HOST = "127.0.0.1"
#: Seconds the server gets to come up (MLflow imports for seconds, and upgrades an old schema).
START_TIMEOUT = 180.0
#: Seconds between SIGINT and SIGTERM, then SIGTERM and SIGKILL, when stopping the server.
STOP_GRACE = 10.0


#: The MLflow UI's classic view. MLflow 3.17 keeps the GenAI / model-training switch in the
#: browser's local storage (default GenAI, whatever the experiment's ``mlflow.experimentKind``:
#: mlflow/mlflow#24498); a ``workflowType`` query parameter on the page's route overrides it
#: for that page only. The start page stores it; links keep the parameter as well, so a server
#: started without the app (an install that predates its entry point) still opens them right.
CLASSIC_VIEW = "workflowType=machine_learning"


class _Stop(Exception):
    """SIGTERM received: stop the server as Ctrl-C would."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


def _check_port(port: int) -> int:
    if not 0 <= port <= 65535:
        raise invalid("port", port, "a TCP port from 1 to 65535 (0: any free port)")
    if port == 0:
        return free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # As uvicorn binds: connections of a server stopped a moment ago (TIME_WAIT) are no
        # obstacle, a listening server is.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((HOST, port))
        except OSError:
            raise invalid(
                "port", port, f"a free port on {HOST} (this one is in use; try --port 0)"
            ) from None
    return port


def app_registered() -> bool:
    """Whether MLflow can find the start-page app (its entry point is in the package metadata,
    written by ``pip install``)."""
    return any(e.name == APP_NAME for e in importlib.metadata.entry_points(group="mlflow.app"))


def server_command(uri: str, port: int, *, app: bool = True) -> tuple[list[str], dict[str, str]]:
    """The ``mlflow server`` command line and the environment entries it needs (with the
    start-page app unless ``app`` is false)."""
    env = {
        "MLFLOW_BACKEND_STORE_URI": uri,
        # Nothing but loopback: no usage telemetry, no background job runner.
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    root = artifact_root(uri)
    if root is not None:
        # Runs logged by fm-optuna name their artifact folder explicitly; this root serves
        # only experiments created from the UI itself.
        env["MLFLOW_ARTIFACTS_DESTINATION"] = root
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        HOST,
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    if app:
        command += ["--app-name", APP_NAME]
    return command, env


def _resolve(uri: str | None) -> str:
    uri = absolute_uri(resolve_tracking_uri(uri))
    if is_server(uri):
        raise ConfigError(
            f"Parameter `tracking_uri` should be a database store for `fm-optuna ui`; "
            f"`{mask_uri(uri)}` is already an MLflow server: open it in a browser."
        )
    if not is_database(uri):
        raise invalid("tracking_uri", mask_uri(uri), "a sqlite:///, postgresql:// or mysql:// URI")
    path = sqlite_path(uri)
    if path is not None and not path.exists():
        raise ConfigError(
            f"Parameter `tracking_uri` should point to an existing store; {path} does not exist "
            "yet (`fm-optuna run` creates it)."
        )
    return uri


def _pump(stream: IO[str], sink: IO[str], uri: str) -> None:
    for line in stream:
        sink.write(redact(line, uri))
        sink.flush()


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as response:
            return bool(response.status == 200)
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def _sigterm_as_stop() -> Iterator[None]:
    def handler(signum: int, frame: FrameType | None) -> None:
        raise _Stop

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave SIGTERM alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _links_of_server(
    uri: str, announce: Callable[[str], None], *, experiment: str | None, open_browser: bool
) -> int:
    """An MLflow server serves its own UI: print the links into it, start nothing."""
    url = uri.rstrip("/")
    if not _healthy(url):
        raise ConfigError(
            f"Parameter `tracking_uri` should be a reachable MLflow server. Found "
            f"`tracking_uri = {mask_uri(uri)}` (no answer on /health)."
        )
    announce(f"fm-optuna ui: {mask_uri(url)} is an MLflow server: its UI is already served there")
    # The server runs MLflow's own app: the links open the model-training view themselves.
    links = _links(url, experiment, announce, start=False)
    if open_browser:
        target = links[0] if links else url
        announce(f"fm-optuna ui: opening {mask_uri(target)}")
        webbrowser.open(target)
    return 0


def _links(
    url: str, experiment: str | None, announce: Callable[[str], None], *, start: bool
) -> list[str]:
    """Announce the runs tables and runs to open; return the runs-table URLs."""
    try:
        lines = browse_links(url, experiment=experiment, start=start)
    except (OSError, ValueError, KeyError) as error:  # the UI still works without the links
        announce(f"fm-optuna ui: could not list the experiments ({type(error).__name__})")
        return []
    if not lines:
        announce("fm-optuna ui: no experiment yet (`fm-optuna run` or `tune` creates one)")
        return []
    announce("fm-optuna ui: open in a browser (runs tables, in the model-training view):")
    for line in lines:
        announce(line)
    return [line.rsplit(" ", 1)[1] for line in lines if "/runs?" in line or "%2Fruns?" in line]


def _stop(child: subprocess.Popen[str]) -> None:
    """SIGINT (MLflow forwards it to its workers), then SIGTERM and SIGKILL to the group."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
        if child.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            if sig == signal.SIGINT:
                child.send_signal(sig)
            else:
                os.killpg(child.pid, sig)  # the child leads its own session and group
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=STOP_GRACE)


def start_link(url: str, route: str = "/experiments") -> str:
    """The start page opening the UI's ``route`` (after ``#``) in the model-training view,
    which the browser keeps for every page it opens next."""
    return f"{url}{START_PATH}?to={urllib.parse.quote(route, safe='/?=&')}"


def _ui_link(url: str, route: str, start: bool) -> str:
    return start_link(url, route) if start else f"{url}/#{route}"


def runs_table_link(url: str, experiment_id: str, *, start: bool = True) -> str:
    """The experiment's runs table in the model-training view, even in a fresh browser
    (through the start page unless ``start`` is false)."""
    return _ui_link(url, f"/experiments/{experiment_id}/runs?{CLASSIC_VIEW}", start)


def run_link(url: str, experiment_id: str, run_id: str, *, start: bool = True) -> str:
    """A run's overview (its description, parameters, metrics) in the model-training view."""
    return _ui_link(url, f"/experiments/{experiment_id}/runs/{run_id}?{CLASSIC_VIEW}", start)


def _post(url: str, path: str, body: dict[str, object]) -> dict[str, object]:
    request = urllib.request.Request(
        f"{url}/api/2.0/mlflow/{path}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return dict(json.load(response))


def _search(url: str, experiment_id: str, where: str) -> list[dict[str, Any]]:
    body = {
        "experiment_ids": [experiment_id],
        "filter": where,
        "order_by": ["attributes.start_time DESC"],
        "max_results": 1,
    }
    return list(_post(url, "runs/search", body).get("runs", []))  # type: ignore[call-overload]


def _run_lines(url: str, experiment_id: str, start: bool) -> list[str]:
    """A study's run and its best COMPLETE trial's run, else the latest finished ForkMerge run
    (the latest one when none has finished)."""
    lines = []
    studies = _search(url, experiment_id, "tags.`fm_optuna.role` = 'study'")
    if studies:
        info, tags = studies[0]["info"], _tags(studies[0])
        lines.append(
            f"    study run {info['run_name']} (trial table): "
            f"{run_link(url, experiment_id, info['run_id'], start=start)}"
        )
        best = tags.get("fm_optuna.best_run_id")
        if best:
            lines.append(
                f"    best trial {tags.get('best_trial', '?')} ForkMerge run: "
                f"{run_link(url, experiment_id, best, start=start)}"
            )
        return lines
    forkmerge = "tags.`fm_optuna.role` = 'forkmerge'"
    runs = _search(url, experiment_id, f"{forkmerge} and attributes.status = 'FINISHED'")
    runs = runs or _search(url, experiment_id, forkmerge)
    if runs:
        info = runs[0]["info"]
        lines.append(
            f"    latest ForkMerge run {info['run_name']}: "
            f"{run_link(url, experiment_id, info['run_id'], start=start)}"
        )
    return lines


def _tags(run: dict[str, Any]) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run.get("data", {}).get("tags", [])}


def browse_links(
    url: str, *, experiment: str | None = None, limit: int = 5, start: bool = True
) -> list[str]:
    """Lines naming the newest experiments' runs tables and each one's latest ForkMerge run
    (in a study, its best complete trial's), through the start page unless ``start`` is false.

    Asked of the running server's REST API, so this process never imports MLflow.
    """
    found = _post(
        url,
        "experiments/search",
        {"max_results": 100, "order_by": ["last_update_time DESC"]},
    ).get("experiments", [])
    experiments = [e for e in found if isinstance(e, dict) and e.get("name") != "Default"]
    if experiment is not None:
        experiments = [e for e in experiments if e.get("name") == experiment]
        if not experiments:
            raise invalid("experiment", experiment, "the name of an experiment in this store")
    lines = []
    for item in experiments[:limit]:
        experiment_id = str(item["experiment_id"])
        lines.append(f"  {item['name']}: {runs_table_link(url, experiment_id, start=start)}")
        lines += _run_lines(url, experiment_id, start)
    if len(experiments) > limit:
        older = len(experiments) - limit
        lines.append(f"  ... and {older} older experiments ({url}/#/experiments)")
    return lines


def run_ui(
    uri: str | None = None,
    *,
    port: int = 5000,
    announce: Callable[[str], None],
    log: IO[str] | None = None,
    experiment: str | None = None,
    open_browser: bool = False,
) -> int:
    """Serve the MLflow UI for ``uri`` on 127.0.0.1 until Ctrl-C (or SIGTERM); return 0.

    Args:
        uri: Tracking store (``None``: ``MLFLOW_TRACKING_URI`` or ``sqlite:///tracking/mlflow.db``).
        port: TCP port on 127.0.0.1 (0 picks a free one).
        announce: Receives the one-line messages for the user (the URL once it answers).
        log: Where the server's own output goes, passwords masked (default: stderr).
        experiment: Link only this experiment (default: the five most recently updated).
        open_browser: Open the first runs table in the default browser once the server answers.

    Raises:
        ConfigError: Not a database store, no such SQLite file, or the port is taken.
    """
    served = absolute_uri(resolve_tracking_uri(uri))
    if is_server(served):
        return _links_of_server(served, announce, experiment=experiment, open_browser=open_browser)
    uri = _resolve(uri)
    port = _check_port(port)
    app = app_registered()
    command, extra_env = server_command(uri, port, app=app)
    url = f"http://{HOST}:{port}"
    root = artifact_root(uri)
    if root is not None and root.startswith("file://"):
        Path(urllib.request.url2pathname(root[len("file://") :])).mkdir(parents=True, exist_ok=True)
    announce(f"fm-optuna ui: starting the MLflow UI for {mask_uri(uri)} ...")
    child = subprocess.Popen(
        command,
        env={**os.environ, **extra_env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=True,  # our Ctrl-C is forwarded once, on purpose, by _stop
    )
    assert child.stdout is not None
    pump = threading.Thread(target=_pump, args=(child.stdout, log or sys.stderr, uri), daemon=True)
    pump.start()
    with _sigterm_as_stop():
        try:
            deadline = time.monotonic() + START_TIMEOUT
            while not _healthy(url):
                if child.poll() is not None:
                    pump.join(timeout=2)
                    raise ConfigError(
                        f"The MLflow server for `{mask_uri(uri)}` exited with code "
                        f"{child.returncode} before answering on {url} (see its output above)."
                    )
                if time.monotonic() > deadline:
                    raise ConfigError(f"The MLflow server did not answer on {url} in time.")
                time.sleep(0.25)
            announce(f"fm-optuna ui: MLflow UI at {url}  (Ctrl-C stops it)")
            home = _ui_link(url, f"/experiments?{CLASSIC_VIEW}", app)
            if app:
                announce(f"fm-optuna ui: start page (model-training view for every page): {home}")
            else:
                announce(
                    "fm-optuna ui: the start page is not installed (`pip install -e .` registers "
                    "its MLflow app); a page opened by a click may show MLflow's GenAI view: "
                    "its 'Model training' switch brings the runs back"
                )
            links = _links(url, experiment, announce, start=app)
            if open_browser:
                target = links[0] if links else home
                announce(f"fm-optuna ui: opening {target}")
                webbrowser.open(target)
            code = child.wait()
            pump.join(timeout=2)
            if code != 0:
                announce(f"fm-optuna ui: the MLflow server exited with code {code}")
                return 1
            return 0
        except (KeyboardInterrupt, _Stop):
            _stop(child)
            pump.join(timeout=2)
            announce("fm-optuna ui: stopped")
            return 0
        finally:
            _stop(child)  # any other way out (an error above) must not leave a server behind
            pump.join(timeout=2)
            child.stdout.close()
