"""The merge-weight ranking (Alg. 2 → Λ_k) and the plan it feeds."""

from __future__ import annotations

import copy

import pytest
import torch

from fm_optuna.config import ForkMergeConfig
from fm_optuna.core._loop import run_forkmerge
from fm_optuna.core._ranking import Ranking, plan_branches, rank_by_merge_weights
from fm_optuna.core._training import seeded_model
from fm_optuna.errors import ConfigError
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


# One clear drop after the first of five auxiliaries (the rest differ by noise).
ONE_GAP = Ranking(("t3", "t1", "t5", "t2", "t4"), (0.9, 0.1, 0.09, 0.08, 0.07), 1.0, "prepass")


@pytest.mark.parametrize(
    ("cut", "tasks"),
    [("gaps", ("t0", "t3")), ("auto", ("t0", "t3")), ("spread", ("t0", "t3", "t1", "t5"))],
)
def test_a_measured_ranking_is_planned_with_its_relevance(cut: str, tasks: tuple[str, ...]) -> None:
    problem = ToyProblem(n_tasks=6)
    config = ForkMergeConfig(dt=10, total_steps=20, branches=3, cut=cut)
    branches, ranking = plan_branches(problem, config, initial(problem), ranking=ONE_GAP)
    assert ranking is ONE_GAP
    assert [b.name for b in branches] == ["target", f"target+top{len(tasks) - 1}", "all"]
    assert branches[1].tasks == tasks


@pytest.mark.parametrize(
    ("ranking", "message"),
    [
        (Ranking(("t1", "t2"), None, 0.0, "given"), "`ranking` should be a permutation"),
        (Ranking(("t1", "t2", "t3"), (1.0, 0.5), 0.0, "prepass"), "3 scores \\(one per"),
    ],
)
def test_a_ranking_of_other_auxiliaries_is_refused(ranking: Ranking, message: str) -> None:
    problem = ToyProblem()
    config = ForkMergeConfig(dt=10, total_steps=20, branches=3)
    with pytest.raises(ConfigError, match=message):
        plan_branches(problem, config, initial(problem), ranking=ranking)


def test_a_resumed_run_takes_its_ranking_from_the_checkpoint() -> None:
    with pytest.raises(ConfigError, match="absent when resuming"):
        run_forkmerge(ToyProblem(), CONFIG, ranking=ONE_GAP, resume_from={})
