"""``greedy``: the paper's Algorithm 3, as the official code runs it.

Branches are visited in decreasing order of their own validation score. The best starts with
unnormalised weight 1; each next branch m tries α·U for α in ``alphas``, where the cap U is the
mean weight of the branches already placed, and keeps the α that set a new overall best score
(strictly better), else 0. Λ is the normalised weight vector.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import numpy as np
import optuna
from optuna.samplers import BaseSampler

from fm_optuna.search._base import Design, MergeStrategy, SearchContext
from fm_optuna.search._simplex import DesignSampler, RawWeights

OFFICIAL_ALPHAS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


def greedy_design(order: Sequence[int], alphas: Sequence[float]) -> Design:
    n = len(order)
    weights = np.zeros(n)
    weights[order[0]] = 1.0
    best = -math.inf
    for placed, branch in enumerate(order[1:], start=1):
        cap = weights.sum() / placed
        chosen = 0.0
        for alpha in alphas:
            weights[branch] = alpha * cap
            score = yield weights.copy()
            if score > best:
                best, chosen = score, weights[branch]
        weights[branch] = chosen


class Greedy(MergeStrategy):
    """Evaluates len(alphas) × (L − 1) candidates; ``merge_trials`` does not apply."""

    name: ClassVar[str] = "greedy"

    def __init__(self, alphas: Sequence[float] = OFFICIAL_ALPHAS) -> None:
        self.alphas = tuple(float(a) for a in alphas)

    def n_trials(self, n_branches: int, budget: int) -> int:
        return len(self.alphas) * (n_branches - 1)

    def sampler(self, context: SearchContext) -> BaseSampler:
        return DesignSampler(greedy_design(context.greedy_order, self.alphas), context.n_branches)

    def suggest(self, trial: optuna.Trial, n_branches: int) -> np.ndarray:
        return RawWeights.suggest(trial, n_branches)
