"""Merging: one-hot Λ reproduces a branch (buffers included), uniform Λ is the mean, order-free."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fm_optuna.core._merging import BranchStack, check_simplex, convex_combination, normalise
from fm_optuna.errors import ConfigError
from tests.conftest import ToyProblem


def trained_states(n: int) -> list[dict[str, torch.Tensor]]:
    """Branches that really differ, BatchNorm running statistics included."""
    problem = ToyProblem(batch_norm=True)
    states = []
    for i in range(n):
        torch.manual_seed(i)
        model = problem.make_model()
        with torch.no_grad():  # a few forward passes in train mode move the BN statistics
            for task in problem.task_names:
                model(problem.data[task]["train"][0] * (i + 1), task)
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    return states


def test_one_hot_reproduces_each_branch_exactly_buffers_included() -> None:
    states = trained_states(3)
    assert any("running_mean" in k for k in states[0]) and any(
        "num_batches_tracked" in k for k in states[0]
    )
    for i in range(3):
        merged = convex_combination(states, np.eye(3)[i])
        for key, value in states[i].items():
            assert torch.equal(merged[key], value), key
            assert merged[key].dtype == value.dtype


def test_uniform_weights_give_the_mean_of_floating_tensors() -> None:
    states = trained_states(4)
    merged = convex_combination(states, [0.25] * 4)
    for key, value in merged.items():
        if value.is_floating_point():
            expected = torch.stack([s[key] for s in states]).mean(0)
            torch.testing.assert_close(value, expected)
    assert "trunk.1.running_var" in merged


def test_branch_order_does_not_matter() -> None:
    states = trained_states(3)
    weights = np.array([0.5, 0.3, 0.2])
    permutation = [2, 0, 1]
    merged = convex_combination(states, weights)
    permuted = convex_combination([states[i] for i in permutation], weights[permutation])
    for key in merged:
        torch.testing.assert_close(merged[key], permuted[key])


def test_stack_is_a_snapshot_and_combines_repeatedly() -> None:
    states = trained_states(2)
    stack = BranchStack(states)
    before = stack.combine([0.5, 0.5])
    for value in states[0].values():
        value.add_(1) if value.is_floating_point() else None
    after = stack.combine([0.5, 0.5])
    for key in before:
        torch.testing.assert_close(before[key], after[key])


@pytest.mark.parametrize("weights", [[0.5, 0.6], [1.2, -0.2], [float("nan"), 1.0], [1.0]])
def test_weights_off_the_simplex_are_rejected(weights: list[float]) -> None:
    with pytest.raises(ConfigError, match="weights"):
        convex_combination(trained_states(2), weights)


def test_normalise_and_check_simplex() -> None:
    np.testing.assert_allclose(normalise([2, 0, 2]), [0.5, 0, 0.5])
    np.testing.assert_allclose(normalise([0, 0]), [1, 0])
    np.testing.assert_allclose(check_simplex([0.25, 0.75]), [0.25, 0.75])
