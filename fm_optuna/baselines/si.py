"""SI: scale-invariant loss, Σ_k log L_k (the ForkMerge paper's "SI" baseline, as in Nash-MTL's).

Its gradient is Σ_k ∇L_k / L_k: every task's gradient divided by its current loss, so rescaling a
task's loss by a constant changes nothing. torchjd's ``GeometricMean`` scalarizer, exp(mean log L),
has the same direction but a magnitude that follows the losses, so it is not SI.

Not linear in the losses, so under mixed precision it runs in bfloat16 without loss scaling. A loss
is floored at the smallest positive float before the log: an exact zero would give −∞ (its task's
gradient is then dropped for that step instead of becoming NaN).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, ClassVar

import torch

from fm_optuna.baselines.base import Baseline

if TYPE_CHECKING:
    from torch import nn

    from fm_optuna.core._training import UpdateRule
    from fm_optuna.problem._tasks import Problem


class LogLossRule:
    def __init__(self, problem: Problem) -> None:
        self.tasks: tuple[str, ...] = problem.task_names

    def backward(self, losses: Mapping[str, torch.Tensor], model: nn.Module) -> None:
        values = torch.stack([losses[task] for task in self.tasks])
        values.clamp(min=torch.finfo(values.dtype).tiny).log().sum().backward()


class ScaleInvariant(Baseline):
    name: ClassVar[str] = "si"
    reference: ClassVar[str] = "Σ log L_k (Navon et al., 2022; ForkMerge's SI)"

    def rule(self, problem: Problem) -> UpdateRule:
        return LogLossRule(problem)
