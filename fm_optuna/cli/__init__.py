"""``fm-optuna``: the command line, one module per command (group).

Every user mistake (unknown name, impossible Δt or L, bad budget) is one line on stderr naming
the parameter, the value and what is allowed, with exit code 2 and nothing written. A training
loss that becomes NaN/inf is one line naming the run, branch, step and task, with exit code 1.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from typing import Any, NoReturn

from fm_optuna.errors import ConfigError, NonFiniteTraining, ProblemWarning

EXIT_USAGE = 2

EXIT_FAILED = 1


class _Parser(argparse.ArgumentParser):
    """argparse that reports a mistake as one line (no usage dump) and exits with 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``fm-optuna`` parser: one subcommand per module of this package."""
    from fm_optuna.cli import _bench, _compare, _methods, _run, _study, _ui

    parser = _Parser(
        prog="fm-optuna", description="ForkMerge with Optuna merge search and MLflow tracking."
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for module in (_run, _ui, _bench, _study, _compare, _methods):
        module.add_command(sub)
    return parser


def _show_problem_warnings(command: str) -> None:
    """Print a :class:`ProblemWarning` as one line (``fm-optuna run: warning: ...``)."""
    default = warnings.showwarning

    def show(message: Any, category: type[Warning], *rest: Any, **kwargs: Any) -> None:
        if issubclass(category, ProblemWarning):
            print(f"fm-optuna {command}: warning: {message}", file=sys.stderr)
        else:
            default(message, category, *rest, **kwargs)

    warnings.simplefilter("always", ProblemWarning)
    warnings.showwarning = show


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings():
            _show_problem_warnings(args.command)
            return int(args.handler(args))
    except ConfigError as error:
        print(f"fm-optuna {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except NonFiniteTraining as error:
        print(f"fm-optuna {args.command}: error: {error}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("fm-optuna: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
