"""``random``: uniform points on the simplex (flat Dirichlet through −log u)."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import optuna
from optuna.samplers import BaseSampler, RandomSampler

from fm_optuna.search._base import MergeStrategy, SearchContext
from fm_optuna.search._simplex import FlatDirichlet


class Random(MergeStrategy):
    name: ClassVar[str] = "random"
    uses_warm_start: ClassVar[bool] = True

    def n_trials(self, n_branches: int, budget: int) -> int:
        return budget

    def sampler(self, context: SearchContext) -> BaseSampler:
        return RandomSampler(seed=context.seed)

    def decisive_ranks(self, n_trials: int) -> int:
        return 1  # the draws ignore scores: only the best one matters

    def suggest(self, trial: optuna.Trial, n_branches: int) -> np.ndarray:
        return FlatDirichlet.suggest(trial, n_branches)

    def warm_start_params(self, weights: np.ndarray) -> dict[str, Any]:
        return FlatDirichlet.params(weights)
