"""``fm-optuna storage-proxy``: Optuna's gRPC storage proxy in front of an RDB storage."""

from __future__ import annotations

import argparse
from typing import Any


def cmd_storage_proxy(args: argparse.Namespace) -> int:
    from fm_optuna.study._proxy import serve_proxy

    serve_proxy(
        args.storage,
        host=args.host,
        port=args.port,
        threads=args.threads,
        announce=lambda line: print(line, flush=True),
    )
    return 0


def add_command(sub: Any) -> None:
    """Register ``storage-proxy``."""
    from fm_optuna.study._proxy import PROXY_THREADS

    proxy = sub.add_parser(
        "storage-proxy",
        help="serve an Optuna RDB storage to many workers (--storage grpc://host:port)",
        description="Serve Optuna's gRPC storage proxy (optuna.storages.run_grpc_proxy_server) "
        "in front of one RDB storage: the workers of a shared study connect with "
        '`--storage grpc://HOST:PORT` (or `storage = "grpc://..."` in the study file) and '
        "need no database credentials; the database sees one pool of connections, not one per "
        "worker. Prints one line naming what it serves, then serves until Ctrl-C or SIGTERM. "
        "See tracking/README.md for a cluster's recipe.",
    )
    proxy.add_argument(
        "--storage",
        required=True,
        help="the RDB storage to serve: postgresql://user:password@host/db (mysql://..., "
        "sqlite:///path.db also work)",
    )
    proxy.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0: every "
        "interface, for workers on other machines: the proxy has no authentication)",
    )
    proxy.add_argument(
        "--port", type=int, default=13000, help="port to listen on (default: 13000; 0: any free)"
    )
    proxy.add_argument(
        "--threads",
        type=int,
        default=PROXY_THREADS,
        help=f"threads serving requests, and the most database connections the proxy opens "
        f"(default: {PROXY_THREADS})",
    )
    proxy.set_defaults(handler=cmd_storage_proxy)
