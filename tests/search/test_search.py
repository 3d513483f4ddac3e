"""Conformance suite every merge strategy passes, plus pinned behaviour of grid and greedy."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fm_optuna.errors import ConfigError
from fm_optuna.search._base import Candidates, MergeDecision
from fm_optuna.search._search import search_merge
from fm_optuna.search.strategies import STRATEGIES, make_strategy
from fm_optuna.search.strategies.grid import simplex_lattice

# Budget and L∞ tolerance within which each strategy must find the interior optimum
# Λ* = (0.2, 0.5, 0.3) of f(Λ) = −‖Λ − Λ*‖². grid and greedy ignore the budget (lattice / α grid).
TOLERANCE = {
    "grid": 1e-9,
    "greedy": 0.05,
    "binary": 0.05,
    "tpe": 0.1,
    "cmaes": 0.1,
    "random": 0.1,
    "gp": 0.1,
    "gradient": 0.1,
}
BUDGET = 30
OPTIMUM = np.array([0.2, 0.5, 0.3])


def quadratic(weights: np.ndarray) -> float:
    return -float(((weights - OPTIMUM) ** 2).sum())


def vertex_scores(objective, n: int) -> tuple[float, ...]:
    return tuple(objective(np.eye(n)[i]) for i in range(n))


def numeric_loss_gradient(objective):
    """The loss −objective and its central-difference gradient: what ``gradient`` follows."""

    def loss_gradient(weights: np.ndarray) -> tuple[float, np.ndarray]:
        step = 1e-4
        grad = np.array(
            [
                (objective(weights - step * e) - objective(weights + step * e)) / (2 * step)
                for e in np.eye(len(weights))
            ]
        )
        return -objective(weights), grad

    return loss_gradient


def search(
    name: str, objective, n: int, *, seed: int = 0, budget: int = BUDGET, **kw
) -> MergeDecision:
    return search_merge(
        Candidates(score=objective, loss_gradient=numeric_loss_gradient(objective)),
        strategy=make_strategy(name),
        n_branches=n,
        budget=budget,
        seed=seed,
        branch_scores=kw.pop("branch_scores", vertex_scores(objective, n)),
        **kw,
    )


@pytest.fixture(params=sorted(STRATEGIES))
def strategy(request: pytest.FixtureRequest) -> str:
    return request.param


class TestEveryStrategy:
    @pytest.mark.parametrize("n", [2, 3, 4])
    def test_every_candidate_and_the_decision_lie_on_the_simplex(
        self, strategy: str, n: int
    ) -> None:
        rng = np.random.default_rng(0)
        target = rng.dirichlet(np.ones(n))
        decision = search(strategy, lambda w: -float(np.abs(w - target).sum()), n, budget=12)
        for weights in [decision.weights] + [t.weights for t in decision.trials]:
            assert len(weights) == n
            assert min(weights) >= 0.0
            assert math.isclose(sum(weights), 1.0, abs_tol=1e-9)

    @pytest.mark.parametrize("corner", [0, 1, 2])
    def test_finds_a_one_hot_optimum(self, strategy: str, corner: int) -> None:
        decision = search(strategy, lambda w: float(w[corner]), 3)
        assert decision.weights[corner] == pytest.approx(1.0)
        assert decision.score == pytest.approx(1.0)

    def test_finds_interior_optimum_within_tolerance(self, strategy: str) -> None:
        decision = search(strategy, quadratic, 3)
        assert np.max(np.abs(np.array(decision.weights) - OPTIMUM)) <= TOLERANCE[strategy] + 1e-12

    def test_same_seed_same_decision(self, strategy: str) -> None:
        first = search(strategy, quadratic, 3, seed=7, warm_start=(0.3, 0.3, 0.4))
        second = search(strategy, quadratic, 3, seed=7, warm_start=(0.3, 0.3, 0.4))
        assert first.weights == second.weights
        assert [t.weights for t in first.trials] == [t.weights for t in second.trials]

    def test_nan_and_infinite_scores_never_win(self, strategy: str) -> None:
        # The true maximum (Λ_0 → 1) is poisoned: scores there are NaN or +inf.
        def poisoned(w: np.ndarray) -> float:
            if w[0] > 0.55:
                return math.nan if w[1] > 0.1 else math.inf
            return float(w[0])

        decision = search(strategy, poisoned, 3, branch_scores=(math.nan, 0.0, 0.0))
        assert math.isfinite(decision.score)
        assert decision.weights[0] <= 0.55
        assert decision.fallback is None
        assert all(t.state == "FAIL" for t in decision.trials if not math.isfinite(t.score))

    def test_all_non_finite_keeps_the_best_single_branch(self, strategy: str) -> None:
        decision = search(strategy, lambda w: math.nan, 3, branch_scores=(0.1, 0.7, 0.3))
        assert decision.weights == (0.0, 1.0, 0.0)
        assert decision.score == 0.7
        assert decision.fallback is not None and "single branch" in decision.fallback

    def test_runs_silently(self, strategy: str, capsys: pytest.CaptureFixture[str]) -> None:
        search(strategy, lambda w: math.nan if w[0] > 0.9 else float(w[1]), 3)
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err == ""


def test_grid_visits_exactly_the_lattice() -> None:
    decision = search("grid", quadratic, 3)
    visited = sorted(t.weights for t in decision.trials)
    assert visited == sorted(simplex_lattice(3, 10))
    assert len(visited) == math.comb(12, 2)  # 66 points of the 0.1-lattice on the 2-simplex


def test_grid_resolution_option_and_bad_resolution() -> None:
    assert make_strategy("grid", resolution=0.25).n_trials(n_branches=3, budget=1) == math.comb(
        6, 2
    )
    with pytest.raises(ConfigError, match="grid_resolution"):
        make_strategy("grid", resolution=0.3)


def official_greedy(scores_by_branch: list[float], objective, alphas=(0, 0.2, 0.4, 0.6, 0.8, 1.0)):
    """Algorithm 3 transcribed step by step from the official loop (running cap, strict >)."""
    ranked = sorted(range(len(scores_by_branch)), key=lambda i: -scores_by_branch[i])
    lam = dict.fromkeys(ranked, 0.0)
    lam[ranked[0]] = 1.0
    best_criteria, visited = -math.inf, []
    for i, name in enumerate(ranked[1:]):
        best_lambda = 0.0
        upper_bound = sum(lam.values()) / (i + 1)
        for alpha in alphas:
            lam[name] = alpha * upper_bound
            total = sum(lam.values())
            point = np.array([lam[b] / total for b in range(len(scores_by_branch))])
            visited.append(point)
            criteria = objective(point)
            if criteria > best_criteria:
                best_criteria, best_lambda = criteria, lam[name]
        lam[name] = best_lambda
    total = sum(lam.values())
    return np.array([lam[b] / total for b in range(len(scores_by_branch))]), visited


def test_greedy_reproduces_algorithm_3_on_a_crafted_example() -> None:
    # A bumpy objective over 4 branches where the greedy path is not the global optimum.
    centre = np.array([0.1, 0.45, 0.15, 0.3])

    def objective(w: np.ndarray) -> float:
        return -float(np.abs(w - centre).sum()) + 0.05 * math.sin(17 * w[2])

    scores = [objective(np.eye(4)[i]) for i in range(4)]
    expected, visited = official_greedy(scores, objective)
    decision = search("greedy", objective, 4, branch_scores=tuple(scores))
    np.testing.assert_allclose(decision.weights, expected, atol=1e-12)
    np.testing.assert_allclose([t.weights for t in decision.trials], visited, atol=1e-12)
    assert decision.n_trials == 6 * 3


def test_binary_bisects_towards_the_optimum_for_two_branches() -> None:
    decision = search(
        "binary", lambda w: -abs(w[1] - 0.3), 2, budget=12, branch_scores=(-0.3, -0.7)
    )
    assert decision.weights[1] == pytest.approx(0.3, abs=1e-3)
    assert decision.n_trials == 12


def test_warm_start_is_the_first_evaluated_trial() -> None:
    for name in ("tpe", "random", "cmaes"):
        decision = search(name, quadratic, 3, warm_start=(0.25, 0.5, 0.25))
        evaluated = [t for t in decision.trials if t.source == "evaluated"]
        np.testing.assert_allclose(evaluated[0].weights, (0.25, 0.5, 0.25), atol=1e-9)


def test_known_branch_scores_are_free_trials() -> None:
    decision = search("tpe", quadratic, 3, budget=5)
    assert decision.n_trials == 5
    assert sum(t.source == "branch" for t in decision.trials) == 3


def test_unknown_strategy_and_bad_budget_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="Parameter `strategy` should be one of"):
        make_strategy("annealing")
    with pytest.raises(ConfigError, match="merge_trials"):
        search("tpe", quadratic, 3, budget=0)
    with pytest.raises(ConfigError, match="merge_trials"):
        search("binary", lambda w: float(w[0]), 4, budget=3)
