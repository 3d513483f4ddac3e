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


class Interrupted(KeyboardInterrupt):
    """SIGINT (Ctrl-C) or SIGTERM (systemd, docker, Slurm, ``timeout``) asked the command to stop.

    A :class:`KeyboardInterrupt`, so everything that cleans up after Ctrl-C cleans up after a
    SIGTERM too; the command prints one line (:meth:`line`) and exits with ``128 + signal``.

    Attributes:
        signum: The signal's number.
        next_step: What the next invocation does (``"trial 7 will be retried from merge 3"``).
    """

    def __init__(self, signum: int) -> None:
        import signal

        self.signum = signum
        self.name = signal.Signals(signum).name
        self.next_step = ""
        super().__init__(f"interrupted by {self.name}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def line(self) -> str:
        return f"interrupted by {self.name}" + (f"; {self.next_step}" if self.next_step else "")


class WriteFailed(FmOptunaError):
    """A file could not be written (a full disk, a read-only or forbidden place).

    Attributes:
        path: The file (or folder) being written.
        reason: The system's words, e.g. ``No space left on device``.
    """

    def __init__(self, path: object, reason: str, *, note: str = "") -> None:
        self.path, self.reason, self.note = path, reason, note
        super().__init__(f"cannot write {path}: {reason}" + (f"; {note}" if note else ""))


def write_failure(error: BaseException) -> str | None:
    """One line for a write refused by the system (``ENOSPC``, ``EROFS``, ``EACCES``,
    ``EDQUOT``, SQLite's "disk is full" / "readonly database") anywhere in ``error``'s chain,
    else ``None``."""
    import errno

    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, WriteFailed):
            return str(current)
        codes = (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT)
        if isinstance(current, OSError) and current.errno in codes:
            where = current.filename or "a file"
            return f"cannot write {where}: {current.strerror}"
        text = str(current).lower()
        for sign, why in (
            ("database or disk is full", "No space left on device (SQLite: disk is full)"),
            ("readonly database", "read-only (SQLite: attempt to write a readonly database)"),
        ):
            if sign in text:
                return f"cannot write a database: {why}"
        current = current.__cause__ or current.__context__
    return None
