"""Shared plumbing of the gradient methods: a torchjd aggregator on the shared parameters.

The per-task losses of our problems come from separate batches (one domain per task), so there is
no single shared feature tensor for ``torchjd.autojac.mtl_backward``. Instead the Jacobian of the
task losses with respect to the problem's *shared* parameters
(:meth:`~fm_optuna.problem.Problem.shared_parameters`) is stored in their ``.jac`` fields and turned
into ``.grad`` by ``torchjd.autojac.jac_to_grad`` with the method's aggregator, as LibMTL and
torchjd do for hard-parameter sharing. Task-specific parameters (heads) get the plain sum of the
task gradients: only the gradient of their own task reaches them, so there is nothing to
aggregate.

The rows are filled by one ``torch.autograd.grad`` per task rather than by
``torchjd.autojac.backward``: with per-task batches each loss's graph is disjoint except for the
parameters, so K separate backward passes cost one summed backward, while ``autojac.backward``
back-propagates every row through every task's graph (measured 2-3x slower per step on digits).

torchjd is imported where it is used, in every baseline module: importing any of it loads cvxpy
(for CAGrad and Nash-MTL; about 1.4 s warm, several seconds cold), which `fm-optuna --help` and a
run without gradient methods never need.

One caveat: a task routed to *another task's head* (digits' ``noisy_mnist`` uses the target's
head) reaches that head too, and there the two gradients are summed, not aggregated.
"""

from __future__ import annotations

import abc
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from fm_optuna.baselines.base import Baseline
from fm_optuna.core._gradients import split_parameters, task_gradients

if TYPE_CHECKING:
    from torch import nn
    from torchjd.aggregation import Aggregator

    from fm_optuna.core._training import UpdateRule
    from fm_optuna.problem._tasks import Problem


@dataclass
class JacobianRule:
    """Aggregate the task Jacobian on the shared parameters; sum the gradients on the heads.

    ``tasks`` fixes the row order of the Jacobian (methods that single out the target, such as
    GCS, put it first).
    """

    problem: Problem
    aggregator: Aggregator
    tasks: tuple[str, ...]

    def backward(self, losses: Mapping[str, torch.Tensor], model: nn.Module) -> None:
        shared, specific = split_parameters(self.problem, model)
        rows = task_gradients(losses, self.tasks, [*shared, *specific])
        for index, parameter in enumerate(shared):
            parameter.jac = torch.stack([row[index] for row in rows])  # type: ignore[attr-defined]
        from torchjd.autojac import jac_to_grad  # on use: importing torchjd loads cvxpy

        with warnings.catch_warnings():
            # cvxpy warns on every fresh Nash-MTL problem that re-solves will not be faster
            # (its problem is not DPP): a speed note about torchjd's formulation, not an error.
            warnings.filterwarnings("ignore", message=".*not DPP.*", category=UserWarning)
            jac_to_grad(shared, self.aggregator)
        for index, parameter in enumerate(specific, start=len(shared)):
            parameter.grad = torch.stack([row[index] for row in rows]).sum(0)


class GradientBaseline(Baseline):
    """A multi-task method defined by a torchjd aggregator over all tasks' gradients."""

    kind: ClassVar[str] = "multi-task"

    @abc.abstractmethod
    def aggregator(self, n_tasks: int) -> Aggregator:
        """A fresh aggregator (stateful ones, GradVac and Nash-MTL, must not be shared)."""

    def rule(self, problem: Problem) -> UpdateRule:
        tasks = problem.task_names
        return JacobianRule(problem, self.aggregator(len(tasks)), tasks)
