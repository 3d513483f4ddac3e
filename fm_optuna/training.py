"""The one training loop: a model, an optimizer, an update rule over task losses, n steps.

ForkMerge branches, STL, EW and every other baseline train through :func:`train`; what differs
is only the :class:`UpdateRule` that turns per-task losses into gradients.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from torch import nn

    from fm_optuna.tasks import Problem

LossCallback = Callable[[int, dict[str, float]], None]


class UpdateRule(Protocol):
    """Turns one step's per-task losses into ``.grad`` on the model's parameters."""

    @property
    def tasks(self) -> tuple[str, ...]:
        """Tasks whose losses the rule needs each step."""
        ...

    def backward(self, losses: Mapping[str, torch.Tensor], model: nn.Module) -> None: ...


@dataclass(frozen=True)
class WeightedSum:
    """Σ_k ω_k L_k: a branch's task-weighting vector, STL (ω = e_target) or EW (ω = 1)."""

    weights: Mapping[str, float]

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(task for task, weight in self.weights.items() if weight != 0.0)

    def backward(self, losses: Mapping[str, torch.Tensor], model: nn.Module) -> None:
        total = sum(self.weights[task] * losses[task] for task in self.tasks)
        total.backward()  # type: ignore[union-attr]


def make_optimizer(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=lr)


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    problem: Problem,
    rule: UpdateRule,
    *,
    steps: int,
    generator: torch.Generator,
    start_step: int = 0,
    log_every: int = 25,
    on_losses: LossCallback | None = None,
) -> None:
    """Run ``steps`` optimizer steps; every ``log_every`` steps report mean per-task losses."""
    model.train()
    tasks = rule.tasks
    running = {task: torch.zeros((), device=problem.device) for task in tasks}
    pending = 0
    for step in range(start_step + 1, start_step + steps + 1):
        optimizer.zero_grad(set_to_none=True)
        losses = problem.task_losses(model, tasks, generator)
        rule.backward(losses, model)
        optimizer.step()
        if on_losses is not None:
            for task in tasks:
                running[task] += losses[task].detach()
            pending += 1
            if pending == log_every or step == start_step + steps:
                # One host sync per report, not per step.
                on_losses(step, {task: float(value) / pending for task, value in running.items()})
                for value in running.values():
                    value.zero_()
                pending = 0
