"""STL: single-task learning on the target alone (the reference of transfer gain)."""

from __future__ import annotations

from typing import ClassVar

from fm_optuna.baselines.base import Baseline
from fm_optuna.core._training import UpdateRule, WeightedSum
from fm_optuna.problem._tasks import Problem


class SingleTask(Baseline):
    name: ClassVar[str] = "stl"
    kind: ClassVar[str] = "single-task"

    def rule(self, problem: Problem) -> UpdateRule:
        return WeightedSum({problem.target: 1.0})
