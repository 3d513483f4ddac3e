"""The baseline seam and the runner every baseline shares."""

from __future__ import annotations

import abc
import copy
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from fm_optuna.events import EventStream, RunStarted, TrainingProgress
from fm_optuna.training import UpdateRule, make_optimizer, train

if TYPE_CHECKING:
    from torch import nn

    from fm_optuna.forkmerge import ForkMergeConfig
    from fm_optuna.tasks import Problem


class Baseline(abc.ABC):
    """A comparison method: the update rule that trains one model on the problem's tasks."""

    name: ClassVar[str]

    @abc.abstractmethod
    def rule(self, problem: Problem) -> UpdateRule: ...


@dataclass
class BaselineResult:
    model: nn.Module
    seconds: float
    final_step: int


def run_baseline(
    baseline: Baseline,
    problem: Problem,
    config: ForkMergeConfig,
    events: EventStream | None = None,
) -> BaselineResult:
    """Train T steps with the same seed, optimizer and budget as ForkMerge.

    The target is validated every Δt steps, as ForkMerge's merges are, so ``final = "best"``
    selects a checkpoint by the same rule for every method.
    """
    from fm_optuna.forkmerge import data_generator, seeded_model, target_score

    events = events or EventStream()
    started = time.perf_counter()
    model = seeded_model(problem, config.seed)
    optimizer = make_optimizer(model, config.lr)
    rule = baseline.rule(problem)
    generator = data_generator(problem, config.seed, 0)  # the same stream as ForkMerge's branch 0
    events.emit(
        RunStarted(
            run=baseline.name,
            params={**config.as_params(), **problem.describe(), "method": baseline.name},
            branches={},
            total_steps=config.total_steps,
        )
    )

    def report(at: int, losses: dict[str, float]) -> None:
        events.emit(
            TrainingProgress(run=baseline.name, branch=baseline.name, step=at, losses=losses)
        )

    best_state, best_score, best_step = None, -math.inf, config.total_steps
    step = 0
    while step < config.total_steps:
        length = min(config.dt, config.total_steps - step)
        train(
            model,
            optimizer,
            problem,
            rule,
            steps=length,
            generator=generator,
            start_step=step,
            log_every=config.log_every,
            on_losses=report,
        )
        step += length
        if config.final == "best":
            score, _ = target_score(problem, model)
            if score > best_score:
                best_state, best_score, best_step = copy.deepcopy(model.state_dict()), score, step
    if best_state is not None:
        model.load_state_dict(best_state)
    return BaselineResult(model, time.perf_counter() - started, best_step)
