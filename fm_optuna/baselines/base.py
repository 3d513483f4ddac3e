"""The baseline seam and the runner every baseline shares.

A baseline is a small (usually frozen-dataclass) object whose fields are its options. Its
:meth:`Baseline.rule_for` builds a *fresh* update rule for one run, so stateful rules (UW's
log-variances, DWA's loss history, GradVac's EMA) never leak between runs.

Besides the training loop's capabilities (:mod:`fm_optuna.core._training`), :func:`run_baseline`
knows two optional ones of a rule:

- ``bind_optimizer(optimizer) -> None``: told the run's optimizer once it exists (IT-MTL
  simulates the optimizer's step for its lookaheads);
- ``window_metrics() -> dict[str, float]``: read at every report point, what the rule saw since
  the last one (IT-MTL's share of steps each candidate won), sent with the window's losses in
  :class:`~fm_optuna.core._events.TrainingProgress` and logged as ``train/<key>``.
"""

from __future__ import annotations

import abc
import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, fields, is_dataclass
from typing import TYPE_CHECKING, ClassVar

from fm_optuna.core._ending import ends_if_raises, final_summary
from fm_optuna.core._events import (
    EventStream,
    RunFinished,
    RunStarted,
    RunSummary,
    TrainingProgress,
)
from fm_optuna.core._training import (
    Optimization,
    UpdateRule,
    data_generator,
    make_optimization,
    rule_parameters,
    seeded_model,
    target_score,
    train,
)
from fm_optuna.errors import NonFiniteTraining
from fm_optuna.problem._tasks import describe_problem

if TYPE_CHECKING:
    import torch
    from torch import nn

    from fm_optuna.config import ForkMergeConfig
    from fm_optuna.problem._tasks import Problem


KINDS = ("single-task", "multi-task", "target-specific")


class Baseline(abc.ABC):
    """A comparison method: the update rule that trains one model on the problem's tasks.

    ``kind`` places the method in the paper's tables: ``single-task`` (STL), ``multi-task``
    (one model for all tasks with some task weighting: EW, UW, DWA, RLW and the gradient methods;
    these are the λ choices over which strong negative transfer is judged) or ``target-specific``
    (the model is trained for the target: PTFT, GCS, Auto-λ, like ForkMerge).
    """

    name: ClassVar[str]
    kind: ClassVar[str] = "multi-task"
    reference: ClassVar[str] = ""  # where the method comes from ("Kendall et al., 2018")

    @abc.abstractmethod
    def rule(self, problem: Problem) -> UpdateRule: ...

    def rule_for(self, problem: Problem, config: ForkMergeConfig) -> UpdateRule:
        """A fresh rule for one run of ``config``; override when it needs the budget or seed."""
        return self.rule(problem)

    def params(self) -> dict[str, object]:
        """The baseline's options, flat and loggable (its dataclass fields)."""
        if not is_dataclass(self):
            return {}
        return {f"{self.name}/{f.name}": getattr(self, f.name) for f in fields(self)}


@dataclass
class BaselineResult:
    model: nn.Module
    seconds: float  # the run's, final evaluation included
    final_step: int
    summary: RunSummary  # what RunFinished carried: the final model on every task, val and test
    rule: UpdateRule | None = None  # the run's rule, with its final state (UW's log-variances)
    optimizer: torch.optim.Optimizer | None = None


def run_baseline(
    baseline: Baseline,
    problem: Problem,
    config: ForkMergeConfig,
    events: EventStream | None = None,
) -> BaselineResult:
    """Train T steps with the same seed, optimizer and budget as ForkMerge.

    The rule comes from :meth:`Baseline.rule_for` (fresh per run); its own learnable tensors, if
    any (UW's log-variances), are optimised by the same optimizer as the model, with ForkMerge's
    schedule, clipping and mixed precision. A non-finite loss raises
    :class:`~fm_optuna.errors.NonFiniteTraining` naming the method, step and task. The target is
    validated every Δt steps, as ForkMerge's merges are, so ``final = "best"`` selects a
    checkpoint by the same rule for every method.

    The run ends itself in ``events``, as a ForkMerge run does: ``RunFinished`` with the final
    model's :class:`~fm_optuna.core.RunSummary`, or FAIL when training or the final evaluation
    raises (the error is re-raised).
    """
    events = events or EventStream()
    started = time.perf_counter()

    def elapsed() -> float:
        return time.perf_counter() - started

    model = seeded_model(problem, config.seed)
    rule = baseline.rule_for(problem, config)
    optimization = make_optimization(model, config, rule_parameters(rule))
    bind_optimizer = getattr(rule, "bind_optimizer", None)
    if bind_optimizer is not None:
        bind_optimizer(optimization.optimizer)
    window_metrics = getattr(rule, "window_metrics", None)
    generator = data_generator(problem, config.seed, 0)  # the same stream as ForkMerge's branch 0
    events.emit(
        RunStarted(
            run=baseline.name,
            params={
                **config.as_params(),
                **describe_problem(problem),
                "method": baseline.name,
                **baseline.params(),
            },
            branches={},
            total_steps=config.total_steps,
        )
    )

    def report(at: int, losses: dict[str, float]) -> None:
        metrics = {} if window_metrics is None else window_metrics()
        events.emit(
            TrainingProgress(
                run=baseline.name, branch=baseline.name, step=at, losses=losses, metrics=metrics
            )
        )

    with ends_if_raises(events, baseline.name, elapsed):
        best_step = _train(baseline, problem, config, model, rule, optimization, generator, report)
        summary = final_summary(
            problem, model, run=baseline.name, step=config.total_steps, elapsed=elapsed
        )
    events.emit(RunFinished(run=baseline.name, summary=summary))
    return BaselineResult(model, summary.seconds, best_step, summary, rule, optimization.optimizer)


def _train(
    baseline: Baseline,
    problem: Problem,
    config: ForkMergeConfig,
    model: nn.Module,
    rule: UpdateRule,
    optimization: Optimization,
    generator: torch.Generator,
    report: Callable[[int, dict[str, float]], None],
) -> int:
    """T steps in rounds of Δt; with ``final = "best"`` ``model`` is left at the round with the
    best target validation score. Returns the final model's step."""
    best_state, best_score, best_step = None, -math.inf, config.total_steps
    step = 0
    while step < config.total_steps:
        length = min(config.dt, config.total_steps - step)
        try:
            train(
                model,
                optimization,
                problem,
                rule,
                steps=length,
                generator=generator,
                start_step=step,
                log_every=config.log_every,
                on_losses=report,
            )
        except NonFiniteTraining as error:
            raise error.located(run=baseline.name) from None
        step += length
        if config.final == "best":
            score, _ = target_score(problem, model)
            if score > best_score:
                best_state, best_score, best_step = copy.deepcopy(model.state_dict()), score, step
    if best_state is not None:
        model.load_state_dict(best_state)
    return best_step
