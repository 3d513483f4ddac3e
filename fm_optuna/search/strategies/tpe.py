"""``tpe``: Optuna's TPE over the stick-breaking parametrisation (good for interior optima)."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np
import optuna
from optuna.samplers import BaseSampler, TPESampler

from fm_optuna.search._base import MergeStrategy, SearchContext
from fm_optuna.search._simplex import StickBreaking


def good_group_size(n_finished: int) -> int:
    """How many of the best finished trials TPE models as "good": Optuna's default gamma (its
    ``gamma`` argument is deprecated; a test checks the two agree, since the exact evaluation
    relies on it, see :meth:`Tpe.decisive_ranks`)."""
    return min(math.ceil(0.1 * n_finished), 25)


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

    def decisive_ranks(self, n_trials: int) -> int:
        # TPE splits finished trials (complete and pruned alike, in trial order) into its good
        # group, the best ``good_group_size(n)``, and the rest; values matter only through that
        # split. A candidate below the largest good group of the study lands in the rest
        # whether it was stopped or scored whole, so the proposals do not change.
        return max(1, good_group_size(n_trials))
