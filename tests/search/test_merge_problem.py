"""Merge problems as data, pruned candidate evaluation and the gradient strategy's loss."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch

from fm_optuna.core._events import EventStream
from fm_optuna.core._loop import ForkMergeConfig, run_forkmerge
from fm_optuna.errors import ConfigError
from fm_optuna.problem._tasks import Problem
from fm_optuna.search._base import Candidates, MergeDecision
from fm_optuna.search._evaluation import CHUNK_EXAMPLES, CHUNK_SCORES, IncumbentPruner
from fm_optuna.search._merge_problem import MergeProblem, MergeProblemWriter, load_data
from fm_optuna.search._search import search_merge
from fm_optuna.search.strategies import make_strategy
from tests.conftest import ToyProblem


def live_run(
    folder: Path, problem: Problem | None = None, **overrides: object
) -> tuple[list[MergeDecision], list[Path]]:
    config = ForkMergeConfig(
        **{
            "total_steps": 6,
            "dt": 2,
            "branches": 3,
            "ranking": "given",
            "strategy": "tpe",
            "merge_trials": 8,
            **overrides,
        }
    )
    writer = MergeProblemWriter(folder, {"benchmark": "toy"})
    result = run_forkmerge(problem or ToyProblem(), config, EventStream([writer]))
    return result.decisions, writer.paths


def test_saved_merge_problems_load_back_into_identical_candidate_scores(tmp_path: Path) -> None:
    decisions, paths = live_run(tmp_path, strategy="grid", grid_resolution=0.25)
    assert [p.name for p in paths] == [f"forkmerge-round00{r}.pt" for r in (1, 2, 3)]
    for decision, path in zip(decisions, paths, strict=True):
        data = load_data(path)
        assert data["source"] == {"benchmark": "toy"} and data["decision"] == decision.to_dict()
        merge = MergeProblem.from_data(data, ToyProblem())
        assert merge.names == ("target", "target+top2", "all")
        for trial in decision.trials:
            assert merge.score(np.array(trial.weights)) == trial.score  # bit for bit
        for index, score in enumerate(merge.branch_scores):
            assert merge.score(np.eye(3)[index]) == score


@pytest.mark.parametrize(
    ("strategy", "pruned"), [("tpe", False), ("gradient", False), ("tpe", True)]
)
def test_replay_gives_the_live_decision(tmp_path: Path, strategy: str, pruned: bool) -> None:
    decisions, paths = live_run(tmp_path, strategy=strategy, pruned_evaluation=pruned)
    for decision, path in zip(decisions, paths, strict=True):
        merge = MergeProblem.from_data(load_data(path), ToyProblem())
        replayed = merge.search(
            make_strategy(strategy), 8, evaluation="pruned" if pruned else "exact"
        )
        assert replayed.weights == decision.weights and replayed.score == decision.score
        assert [t.weights for t in replayed.trials] == [t.weights for t in decision.trials]
        assert [t.state for t in replayed.trials] == [t.state for t in decision.trials]


def test_gradient_without_target_loss_is_one_config_error_before_training() -> None:
    class NoLoss(ToyProblem):
        target_loss = Problem.target_loss  # the default: no differentiable loss

    problem = NoLoss()
    with pytest.raises(ConfigError, match=r"Parameter `strategy`.*needs a differentiable"):
        run_forkmerge(problem, ForkMergeConfig(total_steps=2, dt=1, strategy="gradient"))


def test_loss_gradient_matches_finite_differences(tmp_path: Path) -> None:
    # Without BatchNorm: its statistics follow Λ but the gradient treats them as constants.
    _, paths = live_run(tmp_path, ToyProblem(batch_norm=False), strategy="greedy", total_steps=2)
    merge = MergeProblem.from_data(load_data(paths[0]), ToyProblem(batch_norm=False))
    weights = np.array([0.5, 0.3, 0.2])
    loss, grad = merge.loss_gradient(weights)
    problem = merge.problem

    def loss_at(w: np.ndarray) -> float:
        merge.model.load_state_dict(merge.stack.combine(w / w.sum()))
        with torch.no_grad():
            return float(problem.target_loss(merge.model))

    assert loss == pytest.approx(loss_at(weights), rel=1e-5)
    direction = np.array([1.0, -1.0, 0.0])  # stays on the simplex
    step = 2e-2  # the loss is smooth; a small step would drown in float32 rounding
    numeric = (loss_at(weights + step * direction) - loss_at(weights - step * direction)) / (
        2 * step
    )
    assert grad @ direction == pytest.approx(numeric, rel=2e-2, abs=1e-6)


# --- pruned evaluation -------------------------------------------------------------------------

OPTIMUM = np.array([0.2, 0.5, 0.3])  # a point of the 0.1 lattice
CHUNKS, NOISE = 4, 0.4  # the lattice winner leads every other point by ≥ 2.0 > 2 × NOISE


def true_score(weights: np.ndarray) -> float:
    return -100.0 * float(((weights - OPTIMUM) ** 2).sum())


def noisy_chunks(weights: np.ndarray, chunks: int) -> Iterator[tuple[float, int]]:
    """Chunk scores = true score ± NOISE, with noise summing to zero over the chunks."""
    rng = np.random.default_rng(abs(hash(tuple(np.round(weights, 6)))) % 2**32)
    noise = rng.uniform(-NOISE, NOISE, chunks)
    noise -= noise.mean()
    noise *= NOISE / max(NOISE, float(np.abs(noise).max()))
    for k in range(chunks):
        yield true_score(weights) + float(noise[k]), 25


@pytest.mark.parametrize("strategy", ["grid", "tpe", "random", "greedy"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pruned_evaluation_keeps_the_full_evaluations_choice(strategy: str, seed: int) -> None:
    candidates = Candidates(score=true_score, chunk_scores=noisy_chunks)
    scores = tuple(true_score(np.eye(3)[i]) for i in range(3))
    common = dict(n_branches=3, budget=30, seed=seed, branch_scores=scores)
    full = search_merge(candidates, strategy=make_strategy(strategy), **common)
    pruned = search_merge(
        candidates, strategy=make_strategy(strategy), evaluation="pruned", chunks=CHUNKS, **common
    )
    if strategy in ("grid", "random"):  # the same proposals: the same decision
        assert pruned.weights == full.weights
    # A candidate is stopped only while it trails a finished one, so none it stopped was better
    # than the chosen one by more than the chunk noise could hide (the lattice margin exceeds it).
    chosen = true_score(np.array(pruned.weights))
    for trial in pruned.trials:
        assert true_score(np.array(trial.weights)) <= chosen + 2 * NOISE
    assert pruned.score == pytest.approx(true_score(np.array(pruned.weights)), abs=1e-9)
    assert all(t.fraction < 1 for t in pruned.trials if t.state == "PRUNED")
    assert pruned.validation_passes < full.validation_passes


def test_grid_with_pruned_evaluation_halves_the_forwards_and_finds_the_lattice_optimum() -> None:
    candidates = Candidates(score=true_score, chunk_scores=noisy_chunks)
    decision = search_merge(
        candidates,
        strategy=make_strategy("grid"),
        n_branches=3,
        budget=1,
        seed=0,
        branch_scores=(0.0, 0.0, 0.0),
        evaluation="pruned",
        chunks=CHUNKS,
    )
    np.testing.assert_allclose(decision.weights, OPTIMUM, atol=1e-12)
    assert decision.n_trials == 66
    assert decision.validation_passes <= 66 / 2
    assert any(t.state == "PRUNED" for t in decision.trials)


def test_problems_without_chunks_are_evaluated_whole() -> None:
    decision = search_merge(
        lambda w: float(w[0]),
        strategy=make_strategy("grid"),
        n_branches=2,
        budget=1,
        seed=0,
        branch_scores=(1.0, 0.0),
        evaluation="pruned",
        chunks=4,
    )
    assert all(t.state == "COMPLETE" and t.fraction == 1.0 for t in decision.trials)
    assert math.isclose(decision.weights[0], 1.0)


def pruner_verdict(sigmas: float, seen: list[float], margin: float = 0.0, chunk: int = 125) -> bool:
    """Whether IncumbentPruner stops a candidate with chunk scores ``seen`` so far, against an
    incumbent scoring 96 on each of 4 chunks and a finished rival whose paired difference with
    it varies by ±1–2 points from chunk to chunk (σ per example ≈ 20.4 points)."""
    study = optuna.create_study(direction="maximize")
    for chunks in ([96.0] * 4, [95.0, 97.0, 94.0, 98.0]):
        study.add_trial(
            optuna.trial.create_trial(
                value=float(np.mean(chunks)),
                intermediate_values={k: float(np.mean(chunks[: k + 1])) for k in range(4)},
                user_attrs={CHUNK_SCORES: chunks, CHUNK_EXAMPLES: [chunk] * 4},
            )
        )
    trial = study.ask()
    trial.set_user_attr(CHUNK_SCORES, seen)
    trial.set_user_attr(CHUNK_EXAMPLES, [chunk] * len(seen))
    trial.report(float(np.mean(seen)), len(seen) - 1)
    frozen = study.get_trials(deepcopy=False)[trial.number]
    return IncumbentPruner(margin, sigmas).prune(study, frozen)


def test_pruner_keeps_a_deficit_the_remaining_chunks_could_make_up() -> None:
    # 1 point behind after one chunk: three chunks left could make it up (bar ≈ 2σ√375/125).
    assert not pruner_verdict(2.0, [95.0])
    assert pruner_verdict(0.0, [95.0])  # the aggressive rule stops it
    assert pruner_verdict(2.0, [86.0])  # 10 points behind is beyond what the rest could add
    # After three chunks the bar has fallen below 1 point (≈ 0.87 here).
    assert not pruner_verdict(2.0, [95.5, 95.0, 95.5])
    assert pruner_verdict(2.0, [94.0, 94.0, 94.0])
    assert not pruner_verdict(0.0, [95.0], margin=1.5)  # a fixed margin adds to the bar


def test_prune_sigmas_must_be_a_non_negative_number() -> None:
    with pytest.raises(ConfigError, match=r"Parameter `prune_sigmas`.*non-negative"):
        IncumbentPruner(sigmas=-1.0)
    with pytest.raises(ConfigError, match=r"Parameter `prune_sigmas`.*non-negative"):
        ForkMergeConfig(prune_sigmas=float("nan"))
    with pytest.raises(ConfigError, match=r"Parameter `prune_sigmas`"):
        search_merge(
            lambda w: 0.0,
            strategy=make_strategy("grid"),
            n_branches=2,
            budget=1,
            seed=0,
            branch_scores=(0.0, 0.0),
            evaluation="pruned",
            chunks=2,
            prune_sigmas=-0.5,
        )
