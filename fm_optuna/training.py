"""The one training loop: a model, an optimizer, an update rule over task losses, n steps.

ForkMerge branches, STL, EW and every other baseline train through :func:`train`; what differs
is only the :class:`UpdateRule` that turns per-task losses into gradients.

Two optional capabilities let a rule carry state without a second loop:

- ``begin_step(step: int) -> None`` (:class:`SteppedRule`): called by :func:`train` before each
  global step (1-based) draws its batches, for rules that change with the step (PTFT's
  pre-train → fine-tune switch, DWA's rounds). ``rule.tasks`` is read again at every step.
- ``learnable_parameters() -> list[Tensor]`` (:class:`LearnableRule`): tensors the rule itself
  learns (UW's log-variances); pass them to :func:`make_optimizer` with the model's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from torch import nn

    from fm_optuna.tasks import Problem, Split

LossCallback = Callable[[int, dict[str, float]], None]


class UpdateRule(Protocol):
    """Turns one step's per-task losses into ``.grad`` on the model's parameters."""

    @property
    def tasks(self) -> tuple[str, ...]:
        """Tasks whose losses the rule needs this step (read before every step)."""
        ...

    def backward(self, losses: Mapping[str, torch.Tensor], model: nn.Module) -> None: ...


class SteppedRule(UpdateRule, Protocol):
    """A rule told which global step (1-based) comes next, before its batches are drawn."""

    def begin_step(self, step: int) -> None: ...


class LearnableRule(UpdateRule, Protocol):
    """A rule with learnable tensors of its own, optimised together with the model."""

    def learnable_parameters(self) -> list[torch.Tensor]: ...


def rule_parameters(rule: UpdateRule) -> list[torch.Tensor]:
    """The rule's own learnable tensors (empty for rules without any)."""
    learnable = getattr(rule, "learnable_parameters", None)
    return [] if learnable is None else list(learnable())


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


def make_optimizer(
    model: nn.Module, lr: float, extra: Iterable[torch.Tensor] = ()
) -> torch.optim.Optimizer:
    """Adam over the model's parameters and ``extra`` tensors (a rule's own, e.g. UW's)."""
    extra = list(extra)
    if not extra:
        return torch.optim.Adam(model.parameters(), lr=lr)
    return torch.optim.Adam([*model.parameters(), *extra], lr=lr)


def seeded_model(problem: Problem, seed: int) -> nn.Module:
    """The problem's model initialised from ``seed``, on the problem's device."""
    torch.manual_seed(seed)
    return problem.make_model().to(problem.device)


def data_generator(problem: Problem, seed: int, stream: int) -> torch.Generator:
    """Independent, reproducible data order per (seed, stream)."""
    generator = torch.Generator(device=problem.device)
    generator.manual_seed(seed * 1_000_003 + stream)
    return generator


def target_score(
    problem: Problem, model: nn.Module, split: Split = "val"
) -> tuple[float, dict[str, float]]:
    """The target's score on ``split`` (oriented so that higher is better) and its metrics."""
    metrics = problem.evaluate(model, split, [problem.target])[problem.target]
    return problem.task(problem.target).score(metrics), metrics


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
    """Run ``steps`` optimizer steps; every ``log_every`` steps report mean per-task losses.

    A task's reported mean is over the steps of the window that trained it (a rule's tasks may
    change between steps).
    """
    model.train()
    begin_step = getattr(rule, "begin_step", None)
    running: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    pending = 0
    for step in range(start_step + 1, start_step + steps + 1):
        if begin_step is not None:
            begin_step(step)
        tasks = rule.tasks
        optimizer.zero_grad(set_to_none=True)
        losses = problem.task_losses(model, tasks, generator)
        rule.backward(losses, model)
        optimizer.step()
        if on_losses is not None:
            for task in tasks:
                value = losses[task].detach()
                running[task] = running[task] + value if task in running else value.clone()
                counts[task] = counts.get(task, 0) + 1
            pending += 1
            if pending == log_every or step == start_step + steps:
                # One host sync per report, not per step.
                on_losses(
                    step, {task: float(value) / counts[task] for task, value in running.items()}
                )
                running.clear()
                counts.clear()
                pending = 0
