"""``gp``: Optuna's Gaussian-process sampler over the stick-breaking parametrisation.

Made for small continuous spaces with expensive, deterministic evaluations, which a merge search
is (L − 1 dimensions, one validation pass per candidate). Warm-started as ``tpe`` and ``cmaes``:
the single branches' known scores are its first observations and the previous round's Λ* is its
first candidate.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import optuna
from optuna.samplers import BaseSampler, GPSampler, RandomSampler

from fm_optuna.search._base import MergeStrategy, SearchContext
from fm_optuna.search._simplex import StickBreaking


class Gp(MergeStrategy):
    name: ClassVar[str] = "gp"
    uses_warm_start: ClassVar[bool] = True

    def n_trials(self, n_branches: int, budget: int) -> int:
        return budget

    def sampler(self, context: SearchContext) -> BaseSampler:
        # The L known vertices count as start-up observations; a few random points add interior
        # ones before the model proposes.
        startup = context.n_branches + max(1, min(5, context.budget // 4))
        return GPSampler(
            seed=context.seed,
            n_startup_trials=startup,
            deterministic_objective=True,
            independent_sampler=RandomSampler(seed=context.seed),
            warn_independent_sampling=False,
        )

    def suggest(self, trial: optuna.Trial, n_branches: int) -> np.ndarray:
        return StickBreaking.suggest(trial, n_branches)

    def warm_start_params(self, weights: np.ndarray) -> dict[str, Any]:
        return StickBreaking.params(weights)
