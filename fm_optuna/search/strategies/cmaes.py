"""``cmaes``: CMA-ES over the stick-breaking parametrisation.

CMA-ES needs many trials (≈100 × dimensions) to pay off, and Optuna's CMA-ES does not handle a
one-dimensional space (two branches): there it samples at random, which the comparison shows.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import optuna
from optuna.samplers import BaseSampler, CmaEsSampler, RandomSampler

from fm_optuna.search._base import MergeStrategy, SearchContext
from fm_optuna.search._simplex import StickBreaking


class CmaEs(MergeStrategy):
    name: ClassVar[str] = "cmaes"
    uses_warm_start: ClassVar[bool] = True

    def n_trials(self, n_branches: int, budget: int) -> int:
        return budget

    def sampler(self, context: SearchContext) -> BaseSampler:
        # The warm start arrives as the enqueued first trial (``x0`` is deprecated in Optuna 5).
        return CmaEsSampler(
            seed=context.seed,
            independent_sampler=RandomSampler(seed=context.seed),
            warn_independent_sampling=False,
        )

    def suggest(self, trial: optuna.Trial, n_branches: int) -> np.ndarray:
        return StickBreaking.suggest(trial, n_branches)

    def warm_start_params(self, weights: np.ndarray) -> dict[str, Any]:
        return StickBreaking.params(weights)
