"""Lookahead inter-task affinity, its ranking, agreement between rankings and the heat map."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fm_optuna.config import ForkMergeConfig
from fm_optuna.core._affinity import plot_affinity, task_affinity
from fm_optuna.core._ranking import prepass_ranking, rank_by_affinity, ranking_agreement
from fm_optuna.core._training import seeded_model
from fm_optuna.errors import ConfigError
from tests.conftest import ToyProblem

CONFIG = ForkMergeConfig(dt=10, total_steps=20, lr=1e-2, seed=0)


def initial(problem: ToyProblem) -> dict[str, torch.Tensor]:
    return copy.deepcopy(seeded_model(problem, CONFIG.seed).state_dict())


def test_a_zero_lookahead_step_has_zero_affinity() -> None:
    problem = ToyProblem()
    result = task_affinity(problem, CONFIG, initial(problem), steps=3, lookahead="sgd", sgd_lr=0.0)
    assert result.matrix.shape == (4, 4) and result.measured == 3
    assert np.allclose(result.matrix, 0.0, atol=1e-7)  # the replayed batches are the same


def test_one_sgd_lookahead_matches_the_definition() -> None:
    problem = ToyProblem(batch_norm=False, full_batch=True)
    state = initial(problem)
    eta = 0.05
    result = task_affinity(problem, CONFIG, state, steps=1, lookahead="sgd", sgd_lr=eta)
    model = seeded_model(problem, CONFIG.seed)
    model.load_state_dict(state)
    shared = problem.shared_parameters(model)
    generator = torch.Generator()
    before = problem.task_losses(model, problem.task_names, generator)
    for i, source in enumerate(problem.task_names):
        grads = torch.autograd.grad(before[source], shared, retain_graph=True)
        probe = copy.deepcopy(model)
        with torch.no_grad():
            for p, g in zip(problem.shared_parameters(probe), grads, strict=True):
                p.sub_(eta * g)
        after = problem.task_losses(probe, problem.task_names, generator)
        for j, task in enumerate(problem.task_names):
            expected = 1 - float(after[task].detach()) / float(before[task].detach())
            assert result.matrix[i, j] == pytest.approx(expected, rel=1e-4, abs=1e-7)


def test_self_affinity_is_positive_and_runs_are_reproducible() -> None:
    problem = ToyProblem()
    first = task_affinity(problem, CONFIG, initial(problem), steps=8)
    again = task_affinity(problem, CONFIG, initial(problem), steps=8, every=1)
    assert np.array_equal(first.matrix, again.matrix)
    assert (np.diag(first.matrix) > 0).all()
    assert first.onto("t0")["t0"] == first.matrix[0, 0]
    sparse = task_affinity(problem, CONFIG, initial(problem), steps=8, every=4)
    assert sparse.measured == 2


def test_onto_measures_only_the_requested_columns() -> None:
    problem = ToyProblem()
    result = task_affinity(problem, CONFIG, initial(problem), steps=2, onto=["t0"])
    assert np.isfinite(result.matrix[:, 0]).all()
    assert np.isnan(result.matrix[:, 1:]).all()
    assert result.to_dict()["matrix"][0][1] is None


def test_bad_options_are_one_line_errors() -> None:
    problem = ToyProblem()
    with pytest.raises(ConfigError, match="Parameter `steps`"):
        task_affinity(problem, CONFIG, initial(problem), steps=0)
    with pytest.raises(ConfigError, match="Parameter `lookahead` should be one of adam, sgd"):
        task_affinity(problem, CONFIG, initial(problem), steps=1, lookahead="rmsprop")
    with pytest.raises(ConfigError, match="Parameter `onto`"):
        task_affinity(problem, CONFIG, initial(problem), steps=1, onto=["nope"])


def test_affinity_ranking_puts_an_adversarial_auxiliary_last() -> None:
    problem = ToyProblem(noise_task=True)  # t3's true weights are −3 × the target's
    ranking = rank_by_affinity(problem, CONFIG, initial(problem))
    assert ranking.method == "affinity" and sorted(ranking.order) == ["t1", "t2", "t3"]
    assert ranking.order[-1] == "t3"
    assert ranking.relevance is not None and list(ranking.relevance) == sorted(
        ranking.relevance, reverse=True
    )
    assert ranking.seconds > 0
    prepass = prepass_ranking(problem, CONFIG, initial(problem))
    assert prepass.method == "prepass" and sorted(prepass.order) == sorted(ranking.order)


def test_ranking_agreement() -> None:
    same = ranking_agreement(["a", "b", "c", "d"], ["a", "b", "c", "d"])
    assert (same.kendall_tau, same.top_k_overlap, same.k, same.same_first) == (1.0, 1.0, 2, True)
    reverse = ranking_agreement(["a", "b", "c", "d"], ["d", "c", "b", "a"])
    assert reverse.kendall_tau == -1.0 and reverse.top_k_overlap == 0.0 and not reverse.same_first
    swap = ranking_agreement(["a", "b", "c"], ["a", "c", "b"], k=1)
    assert swap.kendall_tau == pytest.approx(1 / 3) and swap.top_k_overlap == 1.0
    assert ranking_agreement(["a"], ["a"]).kendall_tau == 1.0
    with pytest.raises(ConfigError, match="Parameter `b` should be a permutation"):
        ranking_agreement(["a", "b"], ["a", "c"])


def test_plot_affinity_writes_a_heat_map(tmp_path: Path) -> None:
    matrix = np.array([[0.05, -0.01, math.nan], [0.02, 0.04, 0.0], [-0.03, 0.01, 0.06]])
    path = plot_affinity(matrix, ["a", "b", "c"], tmp_path / "deep" / "affinity.png")
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 5000
