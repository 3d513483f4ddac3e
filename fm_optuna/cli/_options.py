"""Command-line flags generated from the configuration schema (:mod:`fm_optuna.config`).

Every option's flag, type, default and help come from its schema entry, so the command line
cannot drift from the study files and the API. Values are checked by the schema too: a wrong
value is the same one line whichever door it came through.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from typing import Any

from fm_optuna.config import (
    ForkMergeConfig,
    RuntimeOptions,
    SchemaEntry,
    StudyOptions,
    schema,
)
from fm_optuna.errors import invalid

GROUPS = {
    "training": "ForkMerge and its optimisation (every branch, baseline and pre-pass run)",
    "search": "merge search (the inner Optuna study)",
    "study": "study",
    "runtime": "runtime (where and how this process trains)",
}
_CONVERT = {"int": int, "float": float, "str": str, "ints": str, "strs": str}


def _help(entry: SchemaEntry, default: Any) -> str:
    option = entry.option
    text = option.help
    if option.kind == "str" and option.choices:
        text += f"; one of {', '.join(option.choices)}"
    if option.kind in ("ints", "strs"):
        text += " (comma-separated)"
    if option.kind == "bool" or "(default" in text:
        return text
    shown = (
        "none"
        if default is None
        else ",".join(map(str, default))
        if isinstance(default, tuple)
        else default
    )
    return f"{text} (default: {shown})"


def add_flags(
    parser: argparse.ArgumentParser,
    entries: Iterable[SchemaEntry],
    *,
    from_spec: bool = False,
) -> None:
    """Add the flags of ``entries``, grouped by study-file section. With ``from_spec`` the
    defaults are the study file's (an absent flag overrides nothing)."""
    groups: dict[str, Any] = {}
    exclusive: dict[str, Any] = {}
    for entry in entries:
        if entry.flag == "":
            continue
        section = "runtime" if entry.owner is RuntimeOptions else entry.option.section
        if section not in groups:
            groups[section] = parser.add_argument_group(GROUPS.get(section, section))
        target = groups[section]
        if entry.option.exclusive:
            name = entry.option.exclusive
            if name not in exclusive:
                exclusive[name] = target.add_mutually_exclusive_group()
            target = exclusive[name]
        default = None if from_spec else entry.default
        help_ = (
            _help(entry, default)
            if not from_spec
            else entry.option.help + (" (default: the study file's)")
        )
        if entry.option.kind == "bool":
            # A default-on switch is turned off with --no-<flag>.
            action = argparse.BooleanOptionalAction if entry.default else "store_true"
            target.add_argument(
                entry.flag,
                dest=entry.name,
                action=action,
                default=None if from_spec else entry.default,
                help=help_,
            )
            continue
        target.add_argument(
            entry.flag,
            dest=entry.name,
            type=_CONVERT[entry.option.kind],
            default=default,
            metavar=entry.key.upper(),
            help=help_,
        )


def config_flags(*, names: Iterable[str] | None = None) -> list[SchemaEntry]:
    """The entries of ForkMergeConfig (all, or those named), for :func:`add_flags`."""
    wanted = set(names) if names is not None else None
    return [e for e in schema(ForkMergeConfig) if wanted is None or e.name in wanted]


def runtime_flags() -> list[SchemaEntry]:
    return list(schema(RuntimeOptions))


def study_flags(names: Iterable[str]) -> list[SchemaEntry]:
    wanted = set(names)
    return [e for e in schema(StudyOptions) if e.name in wanted]


def values(
    args: argparse.Namespace, entries: Iterable[SchemaEntry], *, from_spec: bool = False
) -> dict[str, Any]:
    """The flags' values by field name, lists parsed from their comma-separated text; with
    ``from_spec``, only the flags given (the rest is the study file's)."""
    given: dict[str, Any] = {}
    for entry in entries:
        if entry.flag == "" or not hasattr(args, entry.name):
            continue
        value = getattr(args, entry.name)
        if value is None and (from_spec or entry.default is not None):
            continue
        if isinstance(value, str) and entry.option.kind in ("ints", "strs"):
            value = _split(entry, value)
        given[entry.name] = value
    return given


def _split(entry: SchemaEntry, text: str) -> tuple[Any, ...]:
    parts = tuple(part.strip() for part in text.split(","))
    if entry.option.kind == "strs":
        return parts
    try:
        return tuple(int(part) for part in parts)
    except ValueError:
        raise invalid(entry.key, text, "comma-separated integers, e.g. 0,1,3") from None


def config_from(args: argparse.Namespace, **overrides: Any) -> ForkMergeConfig:
    """The ForkMerge configuration of a command's flags (every option has one)."""
    return ForkMergeConfig(**{**values(args, config_flags()), **overrides})


def runtime_from(args: argparse.Namespace) -> RuntimeOptions:
    return RuntimeOptions(**values(args, runtime_flags()))
