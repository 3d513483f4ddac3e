"""The MLflow server app of ``fm-optuna ui``: MLflow's own server plus one start page.

MLflow 3.17 keeps the UI's GenAI / model-training switch in the browser's local storage
(``mlflow.workflowType``, GenAI unless the user flips it); a ``workflowType`` query parameter
holds only for the page that carries it, so every click after a printed link used to land in
the GenAI views. The start page, served by the same origin as the UI, stores the model-training
view and then opens the page it was asked for: from there on no click leads to a GenAI view.

Registered under MLflow's ``mlflow.app`` entry-point group (``pyproject.toml``), as MLflow's
basic-auth app is, and chosen with ``mlflow server --app-name fm-optuna``; MLflow's files are
left as they are.
"""

from __future__ import annotations

import html
import json
import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flask import Flask

#: The name the app is registered under (``[project.entry-points."mlflow.app"]``).
APP_NAME = "fm-optuna"
#: Path of the start page; ``?to=<UI route>`` names the page it opens.
START_PATH = "/fm-optuna/start"
#: MLflow's versioned local-storage keys (``<key>_v<version>``) and the values the start page
#: stores, as JSON: the model-training view, and the assistant panel closed (it opens itself
#: on a first visit and takes a third of the page's width).
STORAGE = {
    "mlflow.workflowType_v1": json.dumps("machine_learning"),
    "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": json.dumps(True),
    "mlflow.assistant.panelOpen_v1": json.dumps(False),
}
DEFAULT_ROUTE = "/experiments"
# A route inside the UI (the part after `#`): no scheme, no host, nothing that leaves the page.
_ROUTE = re.compile(r"/[A-Za-z0-9/_\-.~%]*(\?[A-Za-z0-9_\-.~%=&+]*)?")


def start_route(to: str | None) -> str:
    """The UI route the start page opens: ``to`` when it is a route of this UI, else the
    experiments list.

    Example:
        >>> start_route("/experiments/1/runs/abc")
        '/experiments/1/runs/abc'
        >>> start_route("https://example.com")
        '/experiments'
    """
    return to if to and _ROUTE.fullmatch(to) and not to.startswith("//") else DEFAULT_ROUTE


def start_page(to: str | None) -> str:
    """HTML that stores the model-training view and replaces itself with the UI at ``to``."""
    route = start_route(to)
    # json.dumps quotes for JavaScript; "</" never appears inside a script element.
    stores = "".join(
        f"localStorage.setItem({json.dumps(key)},{json.dumps(value)});"
        for key, value in STORAGE.items()
    )
    script = (
        f"try{{{stores}}}catch(e){{}}location.replace({json.dumps('../#' + route)});"
    ).replace("</", "<\\/")
    link = html.escape("../#" + route)
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>fm-optuna · MLflow</title>"
        f"<script>{script}</script></head><body>"
        f"<p>Opening the MLflow UI in the model-training view: <a href='{link}'>continue</a>.</p>"
        "</body></html>"
    )


def add_start_page(app: Flask) -> Flask:
    """Add the start page to MLflow's Flask app (idempotent)."""
    from flask import Response, request

    if "fm_optuna_start" not in app.view_functions:

        def start() -> Response:
            response = Response(start_page(request.args.get("to")), mimetype="text/html")
            response.headers["Cache-Control"] = "no-store"
            return response

        app.add_url_rule(START_PATH, "fm_optuna_start", start, methods=["GET"])
    return app


def create_app() -> Any:
    """The server app (MLflow calls it as a factory): MLflow's app with the start page, as
    an ASGI app under uvicorn (MLflow's default server), else the Flask app."""
    from mlflow.environment_variables import _MLFLOW_SGI_NAME
    from mlflow.server import app as flask_app

    add_start_page(flask_app)
    if _MLFLOW_SGI_NAME.get() == "uvicorn":
        from mlflow.server.fastapi_app import create_fastapi_app

        return create_fastapi_app(flask_app)
    return flask_app
