"""What every command shares: the runtime and tracking flags, the study-file overrides, and
setting torch up (threads, device) from them."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Iterable
from typing import Any

from fm_optuna.cli._options import add_flags, config_flags, runtime_flags, values
from fm_optuna.config import RuntimeOptions

#: The study-file options a spec-reading command can override from its command line.
SPEC_OVERRIDES = ("dt", "total_steps", "branches", "cut", "keep")


def add_runtime(parser: argparse.ArgumentParser, *, json_output: bool = True) -> None:
    """``--device`` and ``--threads`` (the schema's; absent, the study file's), and ``--json``."""
    add_flags(parser, runtime_flags(), from_spec=True)
    if json_output:
        parser.add_argument("--json", action="store_true", help="print the result as JSON")


def add_tracking(parser: Any, *, experiment: str | None = None, no_tracking: bool = True) -> None:
    """``--tracking-uri``, ``--no-tracking`` and ``--experiment`` (when it has a help)."""
    parser.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow store: sqlite:///path.db, postgresql://user:password@host/db or an "
        "http(s):// MLflow server (default: the spec's tracking_uri, else "
        "$MLFLOW_TRACKING_URI, else sqlite:///tracking/mlflow.db with artifacts in "
        "tracking/mlartifacts)",
    )
    if experiment is not None:
        parser.add_argument("--experiment", default=None, help=experiment)
    if no_tracking:
        parser.add_argument("--no-tracking", action="store_true", help="log nothing to MLflow")


def add_spec_overrides(parser: argparse.ArgumentParser, names: Iterable[str]) -> None:
    """Flags overriding the study file's options ``names``; absent flags override nothing."""
    add_flags(parser, config_flags(names=names), from_spec=True)


def spec_config(spec: Any, args: argparse.Namespace, **overrides: Any) -> Any:
    """The spec's configuration with the command line's overrides (and ``overrides``)."""
    given = values(args, config_flags(names=SPEC_OVERRIDES), from_spec=True)
    return spec.config(**{**given, **overrides})


def runtime_of(args: argparse.Namespace, spec: Any = None) -> RuntimeOptions:
    """The spec's runtime options (else the schema's) with the command line's flags."""
    base = spec.runtime if spec is not None else RuntimeOptions()
    return dataclasses.replace(base, **values(args, runtime_flags(), from_spec=True))


def torch_devices(args: argparse.Namespace, spec: Any = None) -> tuple[Any, ...]:
    """Apply the threads policy and return this invocation's torch devices: one, or one per
    branch with ``parallel_branches`` (the study file's, else the flag's).

    A study file's device that is not allowed is one line naming the file and
    ``study.device``; a ``--device`` flag's names ``device``.
    """
    from fm_optuna.core._training import use_runtime
    from fm_optuna.errors import ConfigError

    parallel = (
        spec.base.parallel_branches
        if spec is not None
        else bool(getattr(args, "parallel_branches", False))
    )
    try:
        return use_runtime(runtime_of(args, spec), parallel=parallel)
    except ConfigError as error:
        if spec is None or getattr(args, "device", None) is not None:
            raise
        from fm_optuna.study._spec import at_file_keys

        raise ConfigError(f"{spec.path}: {at_file_keys(str(error))}") from None


def torch_setup(args: argparse.Namespace, spec: Any = None) -> Any:
    """Apply the threads policy and return the first of this invocation's devices: where the
    merge is, and where a command that trains on one device trains."""
    return torch_devices(args, spec)[0]
