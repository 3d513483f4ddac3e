"""``fm-optuna ui``: the MLflow UI on loopback, with links into the runs."""

from __future__ import annotations

import argparse
from typing import Any


def cmd_ui(args: argparse.Namespace) -> int:
    from fm_optuna.tracking.ui import run_ui

    return run_ui(
        args.tracking_uri,
        port=args.port,
        announce=lambda line: print(line, flush=True),
        experiment=args.experiment,
        open_browser=args.open,
    )


def add_command(sub: Any) -> None:
    """Register ``ui``."""
    from fm_optuna.cli._common import add_tracking

    ui = sub.add_parser(  # tracking (issue #3)
        "ui",
        help="browse the tracked runs in the MLflow UI (on 127.0.0.1)",
        description="Start the MLflow UI for the tracking store on 127.0.0.1, print its URL and "
        "serve until Ctrl-C, with links to the newest experiments' runs tables and their "
        "latest ForkMerge runs in the model-training view (the links work in a fresh browser). "
        "See tracking/README.md to serve a store to a team.",
    )
    add_tracking(ui, no_tracking=False)
    ui.add_argument(
        "--port", type=int, default=5000, help="port on 127.0.0.1 (default: 5000; 0: any free)"
    )
    ui.add_argument(
        "--experiment",
        default=None,
        help="link only this experiment (default: the five most recently updated)",
    )
    ui.add_argument(
        "--open",
        action="store_true",
        help="open the first runs table in the default web browser",
    )
    ui.set_defaults(handler=cmd_ui)
