"""Appendix A: one SGD step then a merge equals one step on the Λ-weighted task gradients.

Eq. 8 (two branches), Eq. 13 (ω^k: target + task k) and Eq. 14 (ν^k: target + top-k), checked
with the project's own training loop and merge function on full-batch (deterministic) data.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from fm_optuna.config import ForkMergeConfig
from fm_optuna.core._branches import make_plan
from fm_optuna.core._merging import convex_combination
from fm_optuna.core._training import WeightedSum, make_optimization, train
from tests.conftest import ToyProblem

LR = 0.1


def setup(n_tasks: int) -> tuple[ToyProblem, torch.nn.Module]:
    problem = ToyProblem(n_tasks, batch_norm=False, full_batch=True)
    torch.manual_seed(0)
    return problem, problem.make_model()


def one_step(
    problem: ToyProblem, theta: torch.nn.Module, weights: dict[str, float]
) -> dict[str, torch.Tensor]:
    model = copy.deepcopy(theta)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    train(model, optimizer, problem, WeightedSum(weights), steps=1, generator=torch.Generator())
    return model.state_dict()


def gradients(problem: ToyProblem, theta: torch.nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    grads = {}
    for task in problem.task_names:
        model = copy.deepcopy(theta)
        loss = problem.task_losses(model, [task], torch.Generator())[task]
        loss.backward()
        grads[task] = {
            name: (p.grad if p.grad is not None else torch.zeros_like(p))
            for name, p in model.named_parameters()
        }
    return grads


def expected_step(
    theta: torch.nn.Module, grads, coefficients: dict[str, float]
) -> dict[str, torch.Tensor]:
    return {
        name: p.detach() - LR * sum(c * grads[task][name] for task, c in coefficients.items())
        for name, p in theta.named_parameters()
    }


def assert_params_close(merged: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    for name, value in expected.items():
        torch.testing.assert_close(merged[name], value, rtol=1e-5, atol=1e-6)


def test_eq8_two_branches() -> None:
    problem, theta = setup(2)
    grads = gradients(problem, theta)
    branches = make_plan("pairwise", target="t0", ranked_auxiliaries=["t1"], n_branches=None)
    states = [one_step(problem, theta, dict(b.weights)) for b in branches]
    for lam in (0.0, 0.3, 0.75, 1.0):
        merged = convex_combination(states, [1 - lam, lam])
        assert_params_close(merged, expected_step(theta, grads, {"t0": 1.0, "t1": lam}))


def test_eq13_pairwise_branches() -> None:
    problem, theta = setup(4)
    grads = gradients(problem, theta)
    branches = make_plan(
        "pairwise", target="t0", ranked_auxiliaries=["t1", "t2", "t3"], n_branches=4
    )
    assert [dict(b.weights) for b in branches][1] == {"t0": 1.0, "t1": 1.0}
    states = [one_step(problem, theta, dict(b.weights)) for b in branches]
    lam = np.array([0.1, 0.4, 0.2, 0.3])  # Λ over (target, target+t1, target+t2, target+t3)
    merged = convex_combination(states, lam)
    assert_params_close(
        merged, expected_step(theta, grads, {"t0": 1.0, "t1": lam[1], "t2": lam[2], "t3": lam[3]})
    )


def test_eq14_nested_branches() -> None:
    problem, theta = setup(4)
    grads = gradients(problem, theta)
    ranked = ["t2", "t3", "t1"]
    branches = make_plan("pruned", target="t0", ranked_auxiliaries=ranked, n_branches=4)
    assert [len(b.tasks) for b in branches] == [1, 2, 3, 4]  # ν^1 ... ν^K
    states = [one_step(problem, theta, dict(b.weights)) for b in branches]
    bar = np.array([0.1, 0.2, 0.3, 0.4])  # Λ̄_k
    merged = convex_combination(states, bar)
    # Task ranked i-th gets λ_i = Σ_{k ≥ i} Λ̄_k; the target (rank 1) gets 1.
    tail = np.cumsum(bar[::-1])[::-1]
    coefficients = {"t0": tail[0], "t2": tail[1], "t3": tail[2], "t1": tail[3]}
    assert coefficients["t0"] == pytest.approx(1.0)
    assert_params_close(merged, expected_step(theta, grads, coefficients))


def test_eq14_through_the_configured_sgd_optimizer() -> None:
    """The same identity with the optimizer built from ``optimizer = "sgd"`` (what specs and the
    CLI name), through the Optimization step every branch uses."""
    problem, theta = setup(3)
    grads = gradients(problem, theta)
    config = ForkMergeConfig(optimizer="sgd", lr=LR)
    branches = make_plan("pruned", target="t0", ranked_auxiliaries=["t2", "t1"], n_branches=3)
    states = []
    for branch in branches:
        model = copy.deepcopy(theta)
        optimization = make_optimization(model, config)
        assert type(optimization.optimizer) is torch.optim.SGD and optimization.scheduler is None
        rule = WeightedSum(branch.weights)
        train(model, optimization, problem, rule, steps=1, generator=torch.Generator())
        states.append(model.state_dict())
    bar = np.array([0.5, 0.3, 0.2])
    tail = np.cumsum(bar[::-1])[::-1]
    coefficients = {"t0": tail[0], "t2": tail[1], "t1": tail[2]}
    assert_params_close(convex_combination(states, bar), expected_step(theta, grads, coefficients))
