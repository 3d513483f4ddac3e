"""Per-task gradients on a model's parameters, shared by the gradient baselines and the affinity.

It sits below both :mod:`fm_optuna.baselines` and :mod:`fm_optuna.core._affinity`: each needs one
gradient per task over the shared (trunk) parameters, computed with one backward pass per task.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from torch import nn

    from fm_optuna.problem._tasks import Problem


def split_parameters(
    problem: Problem, model: nn.Module
) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(shared, task-specific) trainable parameters of ``model``."""
    shared = problem.shared_parameters(model)
    ids = {id(parameter) for parameter in shared}
    specific = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    return shared, specific


def task_gradients(
    losses: Mapping[str, torch.Tensor], tasks: tuple[str, ...], params: list[nn.Parameter]
) -> list[list[torch.Tensor]]:
    """One gradient per task over ``params`` (zeros where a task does not reach a parameter)."""
    rows = []
    for index, task in enumerate(tasks):
        grads = torch.autograd.grad(
            losses[task], params, retain_graph=index < len(tasks) - 1, allow_unused=True
        )
        rows.append(
            [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params, strict=True)]
        )
    return rows
