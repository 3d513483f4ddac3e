"""``tpe``: Optuna's TPE over the stick-breaking parametrisation (good for interior optima)."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import optuna
from optuna.samplers import BaseSampler, TPESampler

from fm_optuna.search import MergeStrategy, SearchContext, StickBreaking


class Tpe(MergeStrategy):
    name: ClassVar[str] = "tpe"
    uses_warm_start: ClassVar[bool] = True

    def n_trials(self, n_branches: int, budget: int) -> int:
        return budget

    def sampler(self, context: SearchContext) -> BaseSampler:
        # Half the budget (at most TPE's usual 10) explores at random before the model kicks in.
        startup = max(1, min(10, context.budget // 2))
        return TPESampler(seed=context.seed, n_startup_trials=startup, multivariate=True)

    def suggest(self, trial: optuna.Trial, n_branches: int) -> np.ndarray:
        return StickBreaking.suggest(trial, n_branches)

    def warm_start_params(self, weights: np.ndarray) -> dict[str, Any]:
        return StickBreaking.params(weights)
