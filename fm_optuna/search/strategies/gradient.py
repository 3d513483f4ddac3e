"""``gradient``: Λ = softmax(α), learnt by Adam on the target's validation loss.

As model soups' learned soup and AdaMerging do: the merged model Σ_b Λ_b θ_b is differentiable
in Λ, so a few optimizer steps on the validation loss (through the stacked branch states, see
:class:`fm_optuna.search.MergeProblem`) move Λ towards a better merge. Every iterate is a
trial of the inner study, scored like any other candidate; the decision is the best-scoring
iterate (or single branch), so the loss only steers and the validation score still decides.

The first iterate is the previous round's Λ* (warm start) or the uniform average. Needs a
problem with ``target_loss``; others get a configuration error before training.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np
import optuna
from optuna.samplers import BaseSampler

from fm_optuna.errors import invalid
from fm_optuna.search._base import Design, LossGradient, MergeStrategy, SearchContext
from fm_optuna.search._simplex import DesignSampler, RawWeights

# Softmax cannot reach an exact zero: a warm start's zeros start at this share of the uniform.
FLOOR = 0.05


def softmax(alpha: np.ndarray) -> np.ndarray:
    shifted = np.exp(alpha - alpha.max())
    return shifted / shifted.sum()


def gradient_design(
    start: np.ndarray, loss_gradient: LossGradient, steps: int, lr: float
) -> Design:
    """Yield softmax(α_t) for t = 0..steps−1, α following Adam on the loss (scores unused)."""
    n = len(start)
    alpha = np.log((1 - FLOOR) * start + FLOOR / n)
    first, second = np.zeros(n), np.zeros(n)
    previous = alpha.copy()
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    for t in range(1, steps + 1):
        weights = softmax(alpha)
        yield weights
        if t == steps:
            return
        loss, grad = loss_gradient(weights)
        if not (math.isfinite(loss) and np.all(np.isfinite(grad))):
            alpha = (alpha + previous) / 2  # back off towards the last finite iterate
            continue
        grad_alpha = weights * (grad - weights @ grad)  # chain rule through the softmax
        first = beta1 * first + (1 - beta1) * grad_alpha
        second = beta2 * second + (1 - beta2) * grad_alpha**2
        step = lr * (first / (1 - beta1**t)) / (np.sqrt(second / (1 - beta2**t)) + eps)
        previous, alpha = alpha, alpha - step


class Gradient(MergeStrategy):
    """``merge_trials`` iterates: one validation score and (but for the last) one gradient each."""

    name: ClassVar[str] = "gradient"
    uses_warm_start: ClassVar[bool] = True
    needs_loss_gradient: ClassVar[bool] = True

    def __init__(self, lr: float = 0.3) -> None:
        if not lr > 0:
            raise invalid("gradient_lr", lr, "a positive number")
        self.lr = float(lr)

    def n_trials(self, n_branches: int, budget: int) -> int:
        return budget

    def sampler(self, context: SearchContext) -> BaseSampler:
        if context.loss_gradient is None:
            raise invalid("strategy", self.name, "a strategy the problem supports (no target_loss)")
        start = (
            np.full(context.n_branches, 1.0 / context.n_branches)
            if context.warm_start is None
            else np.asarray(context.warm_start, dtype=np.float64)
        )
        design = gradient_design(start, context.loss_gradient, context.budget, self.lr)
        return DesignSampler(design, context.n_branches)

    def suggest(self, trial: optuna.Trial, n_branches: int) -> np.ndarray:
        return RawWeights.suggest(trial, n_branches)

    def warm_start_params(self, weights: np.ndarray) -> dict[str, Any]:
        return {f"w{i}": float(w) for i, w in enumerate(weights)}
