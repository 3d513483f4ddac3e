"""``fm-optuna``: the command line, one module per command (group).

Every user mistake (unknown name, impossible Δt or L, bad budget) is one line on stderr naming
the parameter, the value and what is allowed, with exit code 2 and nothing written. A training
loss that becomes NaN/inf is one line naming the run, branch, step and task, with exit code 1;
so is a write the system refuses (a full disk, a read-only place). SIGINT (Ctrl-C) and SIGTERM
stop a command gracefully: what is open is ended (MLflow runs KILLED, the trial FAIL and
retryable), one line says what the next invocation does, and the exit code is 130 or 143; a
second signal during that clean-up stops at once.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import sys
import threading
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, NoReturn

from fm_optuna.errors import (
    ConfigError,
    FmOptunaError,
    Interrupted,
    NonFiniteTraining,
    ProblemWarning,
    write_failure,
)

EXIT_USAGE = 2

EXIT_FAILED = 1


class _Parser(argparse.ArgumentParser):
    """argparse that reports a mistake as one line (no usage dump) and exits with 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``fm-optuna`` parser: one subcommand per module of this package."""
    from fm_optuna.cli import _bench, _compare, _methods, _proxy, _run, _study, _ui

    parser = _Parser(
        prog="fm-optuna", description="ForkMerge with Optuna merge search and MLflow tracking."
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for module in (_run, _ui, _bench, _study, _compare, _methods, _proxy):
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


@contextlib.contextmanager
def graceful_signals() -> Iterator[None]:
    """SIGINT and SIGTERM raise :class:`~fm_optuna.errors.Interrupted` (a KeyboardInterrupt)
    in the main thread; a second one while the first is being handled exits at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def second(signum: int, frame: Any) -> None:
        os._exit(128 + signum)

    def first(signum: int, frame: Any) -> None:
        for each in (signal.SIGINT, signal.SIGTERM):
            signal.signal(each, second)
        raise Interrupted(signum)

    previous = {each: signal.signal(each, first) for each in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for each, handler in previous.items():
            signal.signal(each, handler)


#: A command-line value that is a number, negative ones included (``-1e-3``, ``-.5``, ``-inf``).
_NUMBER = re.compile(r"^-(\d|\.\d|inf$|nan$)", re.IGNORECASE)


def _value_flags(parser: argparse.ArgumentParser) -> set[str]:
    """Every option string of ``parser`` and its subcommands that takes one value."""
    flags: set[str] = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                flags |= _value_flags(sub)
        elif action.option_strings and action.nargs is None:
            flags.update(action.option_strings)
    return flags


def negative_values(argv: Sequence[str], parser: argparse.ArgumentParser) -> list[str]:
    """``--lr -1e-3`` as ``--lr=-1e-3``: argparse would take the number for a flag ("expected
    one argument"); joined, the value reaches the schema's check and gets its message."""
    flags = _value_flags(parser)
    joined: list[str] = []
    items = list(argv)
    index = 0
    while index < len(items):
        item = items[index]
        if item in flags and index + 1 < len(items) and _NUMBER.match(items[index + 1]):
            joined.append(f"{item}={items[index + 1]}")
            index += 2
            continue
        joined.append(item)
        index += 1
    return joined


def _check_common(args: argparse.Namespace) -> None:
    """What every command refuses before it does anything: an empty experiment name (it would
    silently become the default one)."""
    from fm_optuna.errors import invalid

    experiment = getattr(args, "experiment", None)
    if experiment is not None and not experiment.strip():
        raise invalid("experiment", repr(experiment), "a non-empty MLflow experiment name")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(negative_values(sys.argv[1:] if argv is None else argv, parser))
    command = f"fm-optuna {args.command}"
    try:
        with graceful_signals(), warnings.catch_warnings():
            _show_problem_warnings(args.command)
            _check_common(args)
            return int(args.handler(args))
    except Interrupted as error:
        print(f"{command}: {error.line()}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        return 130
    except ConfigError as error:
        print(f"{command}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except (NonFiniteTraining, FmOptunaError) as error:
        print(f"{command}: error: {error}", file=sys.stderr)
        return EXIT_FAILED
    except Exception as error:
        line = write_failure(error)
        if line is None:
            raise  # a bug: its traceback is what a report needs
        print(f"{command}: error: {line}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
