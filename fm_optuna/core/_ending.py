"""How every run ends: the code that started it emits one :class:`RunFinished`.

The ForkMerge loop and the baseline runner both train inside :func:`ends_if_raises` (an error
ends the run FAIL with its reason, :class:`RunPruned` ends it PRUNED) and finish with
:func:`final_summary`, so a ForkMerge run and a baseline run report the same summary whichever
door (command, API call, study trial) started them.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch

from fm_optuna.core._events import EventStream, RunFinished, RunPruned, RunSummary
from fm_optuna.errors import NonFiniteTraining

if TYPE_CHECKING:
    from torch import nn

    from fm_optuna.problem._tasks import Problem


def fail_reason(error: BaseException) -> str:
    """``"NonFiniteTraining: training loss became nan (...)"``: the error's type and first line."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


@contextlib.contextmanager
def ends_if_raises(events: EventStream, run: str, elapsed: Callable[[], float]) -> Iterator[None]:
    """Emit the run's RunFinished (PRUNED or FAIL, no metrics) when the block raises; re-raise.

    A ``KeyboardInterrupt`` passes untouched: the observers' ``close`` marks what is still open
    as unfinished.
    """
    try:
        yield
    except RunPruned:
        events.emit(RunFinished(run=run, summary=RunSummary(status="PRUNED", seconds=elapsed())))
        raise
    except Exception as error:
        summary = RunSummary(status="FAIL", seconds=elapsed(), fail_reason=fail_reason(error))
        events.emit(RunFinished(run=run, summary=summary))
        raise


def final_summary(
    problem: Problem, model: nn.Module, *, run: str, step: int, elapsed: Callable[[], float]
) -> RunSummary:
    """The final model of a COMPLETE run on ``val`` and ``test``, every task of ``problem``.

    A non-finite target validation metric raises :class:`~fm_optuna.errors.NonFiniteTraining`
    (the run then ends FAIL): no door reports, selects or tunes on a model that is not one.
    """
    target = problem.task(problem.target)
    with torch.no_grad():  # an evaluation never needs gradients (nor their memory)
        val = problem.evaluate(model, "val")
        test = problem.evaluate(model, "test")
    value = val[target.name][target.metric]
    if not math.isfinite(value):
        raise NonFiniteTraining(
            target.name,
            step,
            value,
            run=run,
            detail=f"the final model's target validation metric is {value}",
        )
    return RunSummary(
        status="COMPLETE",
        seconds=elapsed(),
        target=target.name,
        target_metric=target.metric,
        val={task: dict(metrics) for task, metrics in val.items()},
        test={task: dict(metrics) for task, metrics in test.items()},
    )
