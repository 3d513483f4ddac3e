"""Branch plans: Alg. 1/2 pairwise, Alg. 4 pruned (ν^1 and ν^K always kept), validation."""

from __future__ import annotations

import itertools

import pytest

from fm_optuna.branches import default_branch_count, make_plan
from fm_optuna.errors import ConfigError

AUX = ["a", "b", "c", "d", "e"]


def test_alg1_two_tasks() -> None:
    plan = make_plan("pairwise", target="t", ranked_auxiliaries=["a"], n_branches=None)
    assert [dict(b.weights) for b in plan] == [{"t": 1.0}, {"t": 1.0, "a": 1.0}]


def test_alg2_one_branch_per_auxiliary_plus_target_only() -> None:
    plan = make_plan("pairwise", target="t", ranked_auxiliaries=AUX, n_branches=None)
    assert len(plan) == 6
    assert plan[0].tasks == ("t",)
    assert {b.tasks for b in plan[1:]} == {("t", a) for a in AUX}


@pytest.mark.parametrize(("n_tasks", "expected"), [(2, 2), (3, 2), (4, 2), (5, 3), (6, 3), (9, 4)])
def test_default_branch_count(n_tasks: int, expected: int) -> None:
    assert default_branch_count(n_tasks) == expected


def test_pruned_keeps_target_only_and_all_tasks_and_nests() -> None:
    plan = make_plan("pruned", target="t", ranked_auxiliaries=AUX, n_branches=4)
    assert plan[0].tasks == ("t",)
    assert set(plan[-1].tasks) == {"t", *AUX}
    sizes = [len(b.tasks) for b in plan]
    assert sizes == sorted(sizes) and len(set(sizes)) == 4
    for smaller, larger in itertools.pairwise(plan):  # ν^k ⊂ ν^{k+1}, by rank
        assert set(smaller.tasks) < set(larger.tasks)
    assert plan[1].tasks[:2] == ("t", "a")


def test_pruned_cuts_at_the_largest_relevance_drops() -> None:
    relevance = [0.9, 0.88, 0.5, 0.49, 0.1]  # drops after rank 2 (0.38) and rank 4 (0.39)
    plan = make_plan(
        "pruned", target="t", ranked_auxiliaries=AUX, n_branches=4, relevance=relevance
    )
    assert [len(b.tasks) - 1 for b in plan] == [0, 2, 4, 5]


@pytest.mark.parametrize(
    ("plan", "n", "match"),
    [
        ("pruned", 1, "from 2 to 6"),
        ("pruned", 7, "from 2 to 6"),
        ("pairwise", 3, "one per task"),
        ("nested", 3, "Parameter `plan` should be one of"),
    ],
)
def test_impossible_branch_counts_are_config_errors(plan: str, n: int, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        make_plan(plan, target="t", ranked_auxiliaries=AUX, n_branches=n)
