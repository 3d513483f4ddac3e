"""Parametrisations of the simplex for the strategies' samplers, and :class:`DesignSampler`,
which turns an adaptive design (a generator fed each score) into an Optuna sampler."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, FloatDistribution
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial, TrialState

from fm_optuna.core._merging import normalise
from fm_optuna.search._base import Design


class StickBreaking:
    """Λ_i = s_i Π_{j<i}(1 − s_j), last gets the rest: n−1 params in [0, 1], suits TPE/CMA-ES."""

    @staticmethod
    def suggest(trial: optuna.Trial, n: int) -> np.ndarray:
        sticks = [trial.suggest_float(f"s{i}", 0.0, 1.0) for i in range(n - 1)]
        return StickBreaking.to_simplex(sticks)

    @staticmethod
    def to_simplex(sticks: Sequence[float]) -> np.ndarray:
        weights, remaining = [], 1.0
        for s in sticks:
            weights.append(remaining * s)
            remaining *= 1.0 - s
        weights.append(remaining)
        return normalise(weights)

    @staticmethod
    def params(weights: np.ndarray) -> dict[str, float]:
        params, remaining = {}, 1.0
        for i, w in enumerate(weights[:-1]):
            s = 1.0 if remaining <= 1e-12 else min(1.0, max(0.0, float(w) / remaining))
            params[f"s{i}"] = s
            remaining -= float(w)
        return params


class FlatDirichlet:
    """Λ_i = −log u_i / Σ_j −log u_j: n params; uniform u gives a uniform point on the simplex."""

    LOW = 1e-12

    @staticmethod
    def suggest(trial: optuna.Trial, n: int) -> np.ndarray:
        u = [trial.suggest_float(f"u{i}", FlatDirichlet.LOW, 1.0) for i in range(n)]
        return normalise(-np.log(u))

    @staticmethod
    def params(weights: np.ndarray) -> dict[str, float]:
        return {f"u{i}": float(max(FlatDirichlet.LOW, math.exp(-w))) for i, w in enumerate(weights)}


class RawWeights:
    """Unnormalised non-negative weights w_i ∈ [0, 1], Λ = w / Σ w: what the designs propose."""

    @staticmethod
    def space(n: int) -> dict[str, BaseDistribution]:
        return {f"w{i}": FloatDistribution(0.0, 1.0) for i in range(n)}

    @staticmethod
    def suggest(trial: optuna.Trial, n: int) -> np.ndarray:
        return normalise([trial.suggest_float(f"w{i}", 0.0, 1.0) for i in range(n)])


class DesignSampler(BaseSampler):
    """Runs an adaptive design as a sampler: each trial's point comes from ``design``, which is
    sent the previous trial's score (``-inf`` when that trial failed)."""

    def __init__(self, design: Design, n_branches: int) -> None:
        self._design = design
        self._n = n_branches
        self._started = False

    def infer_relative_search_space(
        self, study: optuna.Study, trial: FrozenTrial
    ) -> dict[str, BaseDistribution]:
        return RawWeights.space(self._n)

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        if not self._started:
            self._started = True
            point = next(self._design)
        else:
            previous = study.get_trials(deepcopy=False)[trial.number - 1]
            score = previous.value if previous.state == TrialState.COMPLETE else -math.inf
            point = self._design.send(float(score))  # type: ignore[arg-type]
        return {f"w{i}": float(v) for i, v in enumerate(point)}

    def sample_independent(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        param_name: str,
        param_distribution: BaseDistribution,
    ) -> Any:
        raise RuntimeError(f"DesignSampler proposes whole points; unexpected param {param_name}")
