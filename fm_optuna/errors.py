"""User-facing errors: one line, naming the parameter, the value and what is allowed."""

from __future__ import annotations

from collections.abc import Iterable


class ConfigError(ValueError):
    """A user mistake in configuration; the CLI prints it as one line and exits with code 2."""


class ProblemWarning(UserWarning):
    """A problem that runs, but probably not as its author meant (e.g. no task heads found)."""


def invalid(parameter: str, value: object, allowed: str) -> ConfigError:
    """Build the house-format error: "Parameter `dt` should be ... Found `dt = 0`."."""
    return ConfigError(
        f"Parameter `{parameter}` should be {allowed}. Found `{parameter} = {value}`."
    )


def one_of(parameter: str, value: object, choices: Iterable[str]) -> ConfigError:
    return invalid(parameter, value, "one of " + ", ".join(sorted(choices)))
