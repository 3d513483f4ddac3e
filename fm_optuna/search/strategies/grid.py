"""``grid``: every point of the simplex lattice with step ``resolution`` (GridSampler)."""

from __future__ import annotations

import itertools
from functools import lru_cache
from typing import ClassVar

import numpy as np
import optuna
from optuna.samplers import BaseSampler, GridSampler

from fm_optuna.errors import invalid
from fm_optuna.search._base import MergeStrategy, SearchContext


@lru_cache(maxsize=32)
def simplex_lattice(n: int, divisions: int) -> tuple[tuple[float, ...], ...]:
    """All points (k_1, ..., k_n) / divisions with non-negative integers k summing to divisions."""
    points = []
    for bars in itertools.combinations(range(divisions + n - 1), n - 1):
        edges = (-1, *bars, divisions + n - 1)
        counts = [edges[i + 1] - edges[i] - 1 for i in range(n)]
        points.append(tuple(c / divisions for c in counts))
    return tuple(points)


class Grid(MergeStrategy):
    """Exhaustive lattice search; the budget is the lattice size, not ``merge_trials``."""

    name: ClassVar[str] = "grid"

    def __init__(self, resolution: float = 0.1) -> None:
        divisions = round(1.0 / resolution) if resolution > 0 else 0
        if divisions < 1 or abs(divisions * resolution - 1.0) > 1e-9:
            raise invalid("grid_resolution", resolution, "1/m for a positive integer m (e.g. 0.1)")
        self.divisions = divisions

    def n_trials(self, n_branches: int, budget: int) -> int:
        return len(simplex_lattice(n_branches, self.divisions))

    def check(self, n_branches: int, budget: int) -> None:
        super().check(n_branches, budget)

    def sampler(self, context: SearchContext) -> BaseSampler:
        n = self.n_trials(context.n_branches, context.budget)
        return GridSampler({"point": list(range(n))}, seed=context.seed)

    def decisive_ranks(self, n_trials: int) -> int:
        return 1  # the lattice's order ignores scores: only the best one matters

    def suggest(self, trial: optuna.Trial, n_branches: int) -> np.ndarray:
        lattice = simplex_lattice(n_branches, self.divisions)
        index = trial.suggest_categorical("point", list(range(len(lattice))))
        return np.asarray(lattice[index])
