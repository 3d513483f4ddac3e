"""EW: equal weighting, Σ_k L_k over every task (ForkMerge's all-task branch run alone)."""

from __future__ import annotations

from typing import ClassVar

from fm_optuna.baselines.base import Baseline
from fm_optuna.core._training import UpdateRule, WeightedSum
from fm_optuna.problem._tasks import Problem


class EqualWeighting(Baseline):
    name: ClassVar[str] = "ew"

    def rule(self, problem: Problem) -> UpdateRule:
        return WeightedSum(dict.fromkeys(problem.task_names, 1.0))
