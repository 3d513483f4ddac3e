"""Exact pruned evaluation: the same decisions as full evaluation, for fewer forwards."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from fm_optuna.core._events import EventStream
from fm_optuna.core._loop import ForkMergeConfig, run_forkmerge
from fm_optuna.problem._tasks import Problem
from fm_optuna.search._base import Candidates
from fm_optuna.search._merge_problem import MergeProblemWriter
from fm_optuna.search._replay import find_merge_problems, load_merge_problems, replay
from fm_optuna.search._search import search_merge
from fm_optuna.search.strategies import make_strategy
from tests.conftest import ToyProblem

EXAMPLES = 400
RNG = np.random.default_rng(0)
#: Example i is right for a candidate Λ whose first weight lies within WIDTHS[i] of CENTRES[i]:
#: most examples are right for every Λ near the optimum, a few separate the candidates.
CENTRES = RNG.uniform(0.2, 0.5, EXAMPLES)
WIDTHS = np.where(RNG.random(EXAMPLES) < 0.9, 1.0, RNG.uniform(0.05, 0.3, EXAMPLES))


def per_example(weights: np.ndarray) -> np.ndarray:
    right = np.abs(weights[0] - CENTRES) <= WIDTHS
    return np.where(right & (weights[2] < 0.6), 100.0, 0.0)


def score(weights: np.ndarray) -> float:
    return float(per_example(np.asarray(weights)).mean())


def example_scores(weights: np.ndarray) -> Callable[[np.ndarray | None], np.ndarray]:
    scores = per_example(np.asarray(weights))
    return lambda index: scores if index is None else scores[index]


CANDIDATES = Candidates(score=score, example_scores=example_scores, example_score_max=100.0)
BRANCHES = tuple(score(np.eye(3)[i]) for i in range(3))


@pytest.mark.parametrize("strategy", ["grid", "random", "tpe", "binary"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_raced_evaluation_chooses_what_full_evaluation_chooses(strategy: str, seed: int) -> None:
    common = dict(n_branches=3, budget=30, seed=seed, branch_scores=BRANCHES)
    full = search_merge(CANDIDATES, strategy=make_strategy(strategy), evaluation="full", **common)
    raced = search_merge(
        CANDIDATES, strategy=make_strategy(strategy), evaluation="pruned", chunks=8, **common
    )
    # Nothing stopped could have won: its full score is never above the decision's.
    for trial in raced.trials:
        assert score(np.array(trial.weights)) <= raced.score
        if trial.state == "PRUNED":
            assert trial.fraction < 1
    assert raced.score == score(np.array(raced.weights))  # always a full evaluation
    if strategy in ("grid", "random"):  # the same proposals: exactly the same decision
        assert raced.weights == full.weights and raced.score == full.score
    else:  # what the sampler learns from a stopped candidate differs, the bar does not
        assert raced.score >= full.score - 100.0 / EXAMPLES * 2
    assert raced.validation_passes < full.validation_passes


@pytest.mark.parametrize("strategy", ["tpe", "grid", "random"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_default_exact_evaluation_searches_exactly_as_full_evaluation(
    strategy: str, seed: int
) -> None:
    """Stopping only candidates below the sampler's decisive ranks changes nothing it does:
    every proposal, every finished score and the decision are those of full evaluation."""
    common = dict(n_branches=3, budget=30, seed=seed, branch_scores=BRANCHES)
    full = search_merge(CANDIDATES, strategy=make_strategy(strategy), evaluation="full", **common)
    exact = search_merge(CANDIDATES, strategy=make_strategy(strategy), **common)  # the default
    assert [t.weights for t in exact.trials] == [t.weights for t in full.trials]
    assert (exact.weights, exact.score) == (full.weights, full.score)
    for a, b in zip(exact.trials, full.trials, strict=True):
        assert a.state == "PRUNED" or a.score == b.score
    assert any(t.state == "PRUNED" for t in exact.trials)
    assert exact.validation_passes < full.validation_passes


def test_tpe_would_search_differently_if_its_good_group_were_stopped() -> None:
    """The decisive ranks matter: stopping every candidate that cannot win (rank 1, as
    ``pruned`` does) changes some of TPE's later proposals on this problem."""
    common = dict(n_branches=3, budget=30, branch_scores=BRANCHES, strategy=make_strategy("tpe"))
    changed = [
        search_merge(CANDIDATES, seed=seed, evaluation="pruned", **common).trials
        != search_merge(CANDIDATES, seed=seed, evaluation="full", **common).trials
        for seed in range(3)
    ]
    assert any(changed)


def test_tpe_good_group_is_optunas() -> None:
    from optuna.samplers._tpe.sampler import default_gamma

    from fm_optuna.search.strategies.tpe import good_group_size

    assert [good_group_size(n) for n in range(400)] == [default_gamma(n) for n in range(400)]


@pytest.mark.parametrize("strategy", ["greedy", "binary", "cmaes"])
def test_samplers_that_learn_from_every_score_are_evaluated_whole_by_default(
    strategy: str,
) -> None:
    decision = search_merge(
        CANDIDATES,
        strategy=make_strategy(strategy),
        n_branches=3,
        budget=12,
        seed=0,
        branch_scores=BRANCHES,
    )
    evaluated = [t for t in decision.trials if t.source == "evaluated"]
    assert evaluated and all(t.fraction == 1.0 for t in evaluated)


def test_grid_raced_needs_under_half_the_forwards() -> None:
    common = dict(n_branches=3, budget=1, seed=0, branch_scores=(0.0, 0.0, 0.0))
    full = search_merge(CANDIDATES, strategy=make_strategy("grid"), evaluation="full", **common)
    raced = search_merge(
        CANDIDATES, strategy=make_strategy("grid"), evaluation="pruned", chunks=8, **common
    )
    assert raced.weights == full.weights and full.validation_passes == 66
    assert raced.validation_passes <= 66 / 2


def test_a_candidate_is_stopped_only_once_even_a_perfect_rest_cannot_win() -> None:
    # Branch 0 scores 100 everywhere; a candidate wrong on one example can at best tie, and a
    # tie goes to the earlier (the branch): it is stopped at its first part holding that example.
    perfect = np.full(EXAMPLES, 100.0)
    one_wrong = perfect.copy()
    one_wrong[7] = 0.0

    def scores(weights: np.ndarray) -> Callable[[np.ndarray | None], np.ndarray]:
        values = perfect if weights[0] == 1.0 else one_wrong
        return lambda index: values if index is None else values[index]

    candidates = Candidates(
        score=lambda w: float(scores(w)(None).mean()),
        example_scores=scores,
        example_score_max=100.0,
    )
    decision = search_merge(
        candidates,
        strategy=make_strategy("random"),
        n_branches=2,
        budget=6,
        seed=0,
        branch_scores=(100.0, float(one_wrong.mean())),
        evaluation="pruned",
        chunks=4,
    )
    evaluated = [t for t in decision.trials if t.source == "evaluated"]
    assert decision.weights == (1.0, 0.0) and decision.score == 100.0
    # The first candidate is scored whole (it tells the examples apart); after it, example 7 is
    # the hardest, first in every order, so each later candidate stops after one part of four.
    assert evaluated[0].fraction == 1.0
    assert all(t.state == "PRUNED" and t.fraction == 0.25 for t in evaluated[1:])


@pytest.fixture(scope="module")
def digits() -> Problem:
    from fm_optuna.benchmarks import build_problem

    torch.set_num_threads(1)
    return build_problem("digits", target="uci", batch_size=8)


def test_digits_example_scores_average_to_the_accuracy_bit_for_bit(digits: Problem) -> None:
    from fm_optuna.core._training import seeded_model, target_score

    model = seeded_model(digits, 0)
    every = digits.target_example_scores(model)
    assert set(every.unique().tolist()) <= {0.0, 100.0}
    assert float(every.mean()) == target_score(digits, model)[0]  # equal counts, equal floats
    index = torch.tensor([5, 3, 400, 0])
    np.testing.assert_array_equal(digits.target_example_scores(model, index), every[index])


class ExampleScoredToy(ToyProblem):
    """The toy problem scoring each validation example: −(prediction − label)², at most 0."""

    target_example_score_max = 0.0
    example_calls = 0

    def target_example_scores(
        self, model: torch.nn.Module, index: torch.Tensor | None = None, split: str = "val"
    ) -> torch.Tensor:
        self.example_calls += 1
        x, y = self.data[self.target][split]
        if index is not None:
            x, y = x[index], y[index]
        was_training = model.training
        model.eval()
        with torch.no_grad():
            scores = -(model(x, self.target) - y).double().pow(2)
        model.train(was_training)
        return scores


def test_a_live_run_raced_decides_as_the_full_run() -> None:
    config = ForkMergeConfig(
        total_steps=6, dt=2, branches=3, ranking="given", strategy="grid", grid_resolution=0.25
    )
    full = run_forkmerge(ExampleScoredToy(), dataclasses.replace(config, full_evaluation=True))
    problem = ExampleScoredToy()
    raced = run_forkmerge(problem, dataclasses.replace(config, pruned_evaluation=True))
    assert problem.example_calls > 0  # the live loop raced its candidates
    for a, b in zip(full.decisions, raced.decisions, strict=True):
        # float32 mse (full) against float64 sums of per-example scores (raced)
        assert a.weights == b.weights and a.score == pytest.approx(b.score, rel=1e-6)
    # A maximum of 0 (a negated error) is a bound like any other: some candidates are stopped.
    passes = [sum(d.validation_passes for d in r.decisions) for r in (raced, full)]
    assert passes[0] < passes[1]


def test_replay_labels_raced_variants_exact(tmp_path: Path) -> None:
    config = ForkMergeConfig(total_steps=4, dt=2, branches=3, ranking="given", strategy="greedy")
    writer = MergeProblemWriter(tmp_path, {"toy": 1})
    run_forkmerge(ExampleScoredToy(), config, EventStream([writer]))
    merges = load_merge_problems(find_merge_problems(tmp_path), lambda _: ExampleScoredToy())
    comparison = replay(merges, ["grid", "tpe"], [6], pruned=True, prune_sigmas=(0.0, 2.0))
    labels = {r.strategy for r in comparison.runs}
    assert labels == {"grid", "tpe", "grid+pruned(exact)", "tpe+pruned(exact)"}


def test_replayed_digits_merges_search_exactly_as_full_evaluation(
    tmp_path: Path, digits: Problem
) -> None:
    """Saved digits merges, replayed with the default evaluation: the same proposals and the
    same decisions as full evaluation, bit for bit, for fewer validation passes."""
    config = ForkMergeConfig(
        total_steps=40, dt=20, branches=3, ranking="given", strategy="tpe", merge_trials=6
    )
    run_forkmerge(digits, config, EventStream([MergeProblemWriter(tmp_path, {"digits": 1})]))
    merges = load_merge_problems(find_merge_problems(tmp_path), lambda _: digits)
    comparison = replay(merges, ["tpe", "random"], [12], exact=True)
    exact = [r for r in comparison.runs if r.strategy.endswith("+exact")]
    assert len(exact) == 2 * len(merges) and all(r.same_search_as_full for r in exact)
    rows = {row["strategy"]: row for row in comparison.rows()}
    assert (
        rows["tpe+exact"]["same_search_as_full"] == 1.0
        and rows["tpe"]["same_search_as_full"] is None
    )
    assert rows["tpe+exact"]["val_passes"] < rows["tpe"]["val_passes"]
    assert rows["tpe+exact"]["regret_mean"] == rows["tpe"]["regret_mean"]
