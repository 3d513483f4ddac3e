"""UW: uncertainty weighting (Kendall et al., 2018) with torchjd's ``UW`` scalarizer.

The loss is Σ_k ½ e^{−s_k} L_k + ½ s_k with one learnable log-variance s_k per task, initialised to
0 (equal weights). The log-variances are the rule's own parameters: ``run_baseline`` adds them to
the Adam optimizer with the model's, at the same learning rate.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from fm_optuna.baselines.base import Baseline

if TYPE_CHECKING:
    from torch import nn

    from fm_optuna.core._training import UpdateRule
    from fm_optuna.problem._tasks import Problem


class UncertaintyRule:
    def __init__(self, problem: Problem) -> None:
        self.tasks: tuple[str, ...] = problem.task_names
        from torchjd.scalarization import UW  # see _jacobian: loaded on use

        self.scalarizer = UW(len(self.tasks)).to(problem.device)

    @property
    def log_variances(self) -> dict[str, float]:
        values = self.scalarizer.log_var.detach().tolist()
        return dict(zip(self.tasks, values, strict=True))

    def learnable_parameters(self) -> list[torch.Tensor]:
        return list(self.scalarizer.parameters())

    def backward(self, losses: Mapping[str, torch.Tensor], model: nn.Module) -> None:
        self.scalarizer(torch.stack([losses[task] for task in self.tasks])).backward()


@dataclass(frozen=True)
class UncertaintyWeighting(Baseline):
    name: ClassVar[str] = "uw"
    reference: ClassVar[str] = "Kendall et al., 2018"

    def rule(self, problem: Problem) -> UpdateRule:
        return UncertaintyRule(problem)
