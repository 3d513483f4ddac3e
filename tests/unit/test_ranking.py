"""The merge-weight ranking (Alg. 2 → Λ_k) and the plan it feeds."""

from __future__ import annotations

import copy

import pytest
import torch

from fm_optuna.config import ForkMergeConfig
from fm_optuna.ranking import plan_branches, rank_by_merge_weights
from fm_optuna.training import seeded_model
from tests.conftest import ToyProblem

CONFIG = ForkMergeConfig(dt=10, total_steps=20, lr=1e-2, seed=0, strategy="greedy")


def initial(problem: ToyProblem) -> dict[str, torch.Tensor]:
    return copy.deepcopy(seeded_model(problem, CONFIG.seed).state_dict())


def test_merge_ranking_orders_auxiliaries_by_their_merge_weight() -> None:
    problem = ToyProblem(noise_task=True)  # t3's true weights are −3 × the target's
    ranking = rank_by_merge_weights(problem, CONFIG, initial(problem))
    assert ranking.method == "merge" and sorted(ranking.order) == ["t1", "t2", "t3"]
    relevance = ranking.relevance
    assert relevance is not None and list(relevance) == sorted(relevance, reverse=True)
    assert all(weight >= 0 for weight in relevance) and sum(relevance) <= 1 + 1e-9
    assert ranking.order[-1] == "t3" and relevance[-1] == pytest.approx(0.0)
    again = rank_by_merge_weights(problem, CONFIG, initial(problem))
    assert (again.order, again.relevance) == (ranking.order, relevance)  # seeded


def test_merge_ranking_feeds_the_pruned_plan() -> None:
    problem = ToyProblem(noise_task=True)
    config = ForkMergeConfig(
        dt=10, total_steps=20, lr=1e-2, ranking="merge", branches=3, cut="spread"
    )
    branches, ranking = plan_branches(problem, config, initial(problem))
    assert ranking.method == "merge"
    assert [b.name for b in branches] == ["target", "target+top2", "all"]
    assert "t3" not in branches[1].tasks
