"""``binary``: bisection on λ between two branches; coordinate-wise bisection for more.

Two branches (best first by own score): evaluate λ = 0 and λ = 1, then repeatedly evaluate the
midpoint and drop the half next to the worse end. More branches: the greedy order and cap of
Algorithm 3, with each new branch's weight bisected on [0, cap] instead of gridded; the budget
is split evenly over the L − 1 coordinates.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import numpy as np
import optuna
from optuna.samplers import BaseSampler

from fm_optuna.errors import invalid
from fm_optuna.search._base import Design, MergeStrategy, SearchContext
from fm_optuna.search._simplex import DesignSampler, RawWeights


def _split(budget: int, parts: int) -> list[int]:
    return [budget // parts + (1 if i < budget % parts else 0) for i in range(parts)]


def bisection_design(order: Sequence[int], budget: int) -> Design:
    n = len(order)
    weights = np.zeros(n)
    weights[order[0]] = 1.0
    current: float | None = None  # score of the point chosen so far, once known
    for placed, (branch, evaluations) in enumerate(
        zip(order[1:], _split(budget, n - 1), strict=True), start=1
    ):
        cap = weights.sum() / placed
        seen: list[tuple[float, float]] = []  # (weight of `branch`, score) in evaluation order

        def at(value: float) -> np.ndarray:
            point = weights.copy()
            point[branch] = value  # noqa: B023 - `branch` is fixed while this coordinate runs
            if n == 2:  # plain bisection on λ ∈ [0, 1]: Λ = (1 − λ, λ) in the greedy order
                point[order[0]] = 1.0 - value
            return point

        low, high = 0.0, cap
        if current is None:
            low_score = yield at(low)
            evaluations -= 1
        else:
            low_score = current
        seen.append((low, low_score))
        high_score = yield at(high)
        evaluations -= 1
        seen.append((high, high_score))
        for _ in range(evaluations):
            middle = (low + high) / 2
            middle_score = yield at(middle)
            seen.append((middle, middle_score))
            if low_score >= high_score:
                high, high_score = middle, middle_score
            else:
                low, low_score = middle, middle_score
        best_value, current = seen[0]
        for value, score in seen[1:]:
            if score > current or (not math.isfinite(current) and math.isfinite(score)):
                best_value, current = value, score
        weights[branch] = best_value


class Binary(MergeStrategy):
    name: ClassVar[str] = "binary"

    def n_trials(self, n_branches: int, budget: int) -> int:
        return budget

    def check(self, n_branches: int, budget: int) -> None:
        # Each coordinate needs its two ends; the first also needs λ = 0 (the best branch alone).
        minimum = 2 + (n_branches - 2)
        if budget < minimum:
            raise invalid(
                "merge_trials",
                budget,
                f"at least {minimum} for binary search over {n_branches} branches",
            )

    def sampler(self, context: SearchContext) -> BaseSampler:
        return DesignSampler(
            bisection_design(context.greedy_order, context.budget), context.n_branches
        )

    def suggest(self, trial: optuna.Trial, n_branches: int) -> np.ndarray:
        return RawWeights.suggest(trial, n_branches)
