"""Pure state-dict arithmetic for merging branches: θ* = Σ_b Λ_b θ_b. No Optuna here.

Parameters *and* floating-point buffers (BatchNorm running statistics) are combined. Integer
buffers (BatchNorm's ``num_batches_tracked``) cannot be averaged meaningfully; they are taken
from the branch with the largest weight (the first such branch on a tie) so a one-hot Λ
reproduces that branch exactly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from fm_optuna.errors import invalid

State = Mapping[str, torch.Tensor]
SIMPLEX_TOLERANCE = 1e-6


def check_simplex(weights: Sequence[float] | np.ndarray, n: int | None = None) -> np.ndarray:
    """Return ``weights`` as a float array after checking they are a point of the simplex."""
    array = np.asarray(weights, dtype=np.float64)
    if array.ndim != 1 or (n is not None and array.size != n):
        raise invalid("weights", list(array.ravel()), f"a vector of {n} branch weights")
    if not np.all(np.isfinite(array)) or np.any(array < -SIMPLEX_TOLERANCE):
        raise invalid("weights", array.tolist(), "finite and non-negative")
    if abs(array.sum() - 1.0) > SIMPLEX_TOLERANCE:
        raise invalid("weights", array.tolist(), "summing to 1")
    return np.clip(array, 0.0, None)


def normalise(raw: Sequence[float] | np.ndarray) -> np.ndarray:
    """Project non-negative unnormalised weights onto the simplex (all-zero → first branch)."""
    array = np.clip(np.asarray(raw, dtype=np.float64), 0.0, None)
    total = array.sum()
    if total <= 0.0 or not np.isfinite(total):
        one_hot = np.zeros_like(array)
        one_hot[0] = 1.0
        return one_hot
    return array / total


class BranchStack:
    """The branches' states stacked once, so many candidate Λ can be combined cheaply.

    A merge search evaluates tens of candidates; stacking each tensor as (L, ...) once makes a
    candidate one ``tensordot`` per tensor instead of L scaled copies.

    Example:
        >>> a = {"w": torch.zeros(2)}; b = {"w": torch.ones(2)}
        >>> BranchStack([a, b]).combine([0.25, 0.75])["w"].tolist()
        [0.75, 0.75]
    """

    def __init__(self, states: Sequence[State]) -> None:
        if len(states) < 1:
            raise invalid("states", len(states), "at least one branch state")
        keys = list(states[0].keys())
        for state in states[1:]:
            if list(state.keys()) != keys:
                raise ValueError(
                    "Every branch must have the same state-dict keys in the same order."
                )
        self.n_branches = len(states)
        self._float: dict[str, torch.Tensor] = {}
        self._other: dict[str, list[torch.Tensor]] = {}
        for key in keys:
            tensors = [state[key].detach() for state in states]
            if tensors[0].is_floating_point():
                self._float[key] = torch.stack(tensors)
            else:
                self._other[key] = tensors
        self._keys = keys

    def combine(self, weights: Sequence[float] | np.ndarray) -> dict[str, torch.Tensor]:
        """The convex combination Σ_b Λ_b θ_b as a new state dict (same key order)."""
        lam = check_simplex(weights, self.n_branches)
        with torch.no_grad():
            return self.combine_tensor(torch.as_tensor(lam, dtype=torch.float64))

    def combine_tensor(self, weights: torch.Tensor) -> dict[str, torch.Tensor]:
        """Σ_b Λ_b θ_b for Λ given as a tensor, differentiable in Λ (no simplex check).

        The ``gradient`` merge strategy descends a validation loss through this.
        """
        dominant = int(torch.argmax(weights.detach()))
        merged: dict[str, torch.Tensor] = {}
        for key in self._keys:
            if key in self._float:
                stacked = self._float[key]
                coefficients = weights.to(dtype=stacked.dtype, device=stacked.device)
                merged[key] = torch.tensordot(coefficients, stacked, dims=1)
            else:
                merged[key] = self._other[key][dominant].clone()
        return merged

    def branch(self, index: int) -> dict[str, torch.Tensor]:
        """Branch ``index``'s own state, as it was stacked."""
        return {
            key: self._float[key][index] if key in self._float else self._other[key][index]
            for key in self._keys
        }


def convex_combination(
    states: Sequence[State], weights: Sequence[float] | np.ndarray
) -> dict[str, torch.Tensor]:
    """θ* = Σ_b Λ_b θ_b over parameters and buffers; ``weights`` must lie on the simplex."""
    return BranchStack(states).combine(weights)
