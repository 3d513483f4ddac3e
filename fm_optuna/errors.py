"""User-facing errors: one line, naming the parameter, the value and what is allowed."""

from __future__ import annotations

import math
from collections.abc import Iterable


class FmOptunaError(Exception):
    """Base of the errors fm_optuna raises on purpose (the CLI prints them as one line)."""


class ConfigError(FmOptunaError, ValueError):
    """A user mistake in configuration; the CLI prints it as one line and exits with code 2."""


class NonFiniteTraining(FmOptunaError):
    """A training loss became NaN or infinite (the run cannot give a meaningful model).

    Attributes:
        task: The first task whose loss was non-finite.
        step: The global optimizer step (1-based) of that loss.
        value: The loss value (``nan``, ``inf`` or ``-inf``).
        run: The run it happened in (``"forkmerge"``, ``"stl"``, ...), when known.
        branch: The ForkMerge branch (or the baseline's name), when known.
    """

    def __init__(
        self,
        task: str,
        step: int,
        value: float,
        *,
        run: str | None = None,
        branch: str | None = None,
        detail: str = "",
    ) -> None:
        self.task, self.step, self.value = task, step, value
        self.run, self.branch, self.detail = run, branch, detail
        super().__init__(self.message())

    def where(self) -> str:
        """``task `t1` at step 37 in branch `t0+t1` of forkmerge``."""
        place = f"task `{self.task}` at step {self.step}"
        if self.branch is not None and self.branch != self.run:
            place += f" in branch `{self.branch}`"
        if self.run is not None:
            place += f" of {self.run}"
        return place

    def message(self) -> str:
        return (
            f"training loss became {self.value} ({self.where()})"
            + (f"; {self.detail}" if self.detail else "")
            + ". Lower the learning rate, clip gradients (clip_grad_norm) or check the "
            "problem's losses."
        )

    def located(self, *, run: str | None = None, branch: str | None = None) -> NonFiniteTraining:
        """The same error, told which run and branch it happened in."""
        return NonFiniteTraining(
            self.task,
            self.step,
            self.value,
            run=run if run is not None else self.run,
            branch=branch if branch is not None else self.branch,
            detail=self.detail,
        )


class ProblemWarning(UserWarning):
    """A problem that runs, but probably not as its author meant (e.g. no task heads found)."""


def invalid(parameter: str, value: object, allowed: str) -> ConfigError:
    """Build the house-format error: "Parameter `dt` should be ... Found `dt = 0`."."""
    return ConfigError(
        f"Parameter `{parameter}` should be {allowed}. Found `{parameter} = {value}`."
    )


def one_of(parameter: str, value: object, choices: Iterable[str]) -> ConfigError:
    return invalid(parameter, value, "one of " + ", ".join(sorted(choices)))


def check_finite(parameter: str, value: object, allowed: str = "a finite number") -> float:
    """``value`` as a float, or the house-format error when it is not a finite real number."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise invalid(parameter, value, allowed)
    return float(value)
