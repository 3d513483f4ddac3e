"""Branch plans: Alg. 1/2 pairwise, Alg. 4 pruned (ν^1 and ν^K always kept), validation."""

from __future__ import annotations

import itertools
import random

import pytest

from fm_optuna.core._branches import CUT_RULES, default_branch_count, make_plan, spread_cuts
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


def test_gaps_rule_cuts_at_the_largest_relevance_drops() -> None:
    relevance = [0.9, 0.88, 0.5, 0.49, 0.1]  # drops after rank 2 (0.38) and rank 4 (0.39)
    plan = make_plan(
        "pruned", target="t", ranked_auxiliaries=AUX, n_branches=4, relevance=relevance, cut="gaps"
    )
    assert [len(b.tasks) - 1 for b in plan] == [0, 2, 4, 5]


TEN = [f"a{i}" for i in range(10)]
# The pre-pass scores of QM9's ten auxiliaries for target μ (seed 0, Δt = 100; see
# studies/qm9-cut-rules/): the drops are noise, and with L = 4 the largest two sit side by side
# near `all`.
NOISY = [-0.8421, -0.8422, -0.8512, -0.857, -0.8661, -0.8667, -0.8715, -0.8866, -0.9003, -0.9033]


def kept(relevance: list[float] | None, n_branches: int, cut: str = "auto") -> list[int]:
    plan = make_plan(
        "pruned",
        target="t",
        ranked_auxiliaries=TEN[: len(relevance)] if relevance else TEN,
        n_branches=n_branches,
        relevance=relevance,
        cut=cut,
    )
    return [len(branch.tasks) - 1 for branch in plan]


def spacing_holds(counts: list[int], n_branches: int) -> bool:
    """Consecutive kept ν^k differ by at least ⌊n / (L − 1)⌋ auxiliaries (the spread rule)."""
    least = counts[-1] // (n_branches - 1)
    return all(b - a >= least for a, b in itertools.pairwise(counts))


@pytest.mark.parametrize("n_branches", [3, 4, 5, 6, 11])
@pytest.mark.parametrize("relevance", [None, [0.0] * 10, NOISY], ids=["none", "flat", "noisy"])
def test_default_rule_spreads_branches_when_no_drop_stands_out(
    relevance: list[float] | None, n_branches: int
) -> None:
    counts = kept(relevance, n_branches)
    assert counts == kept(relevance, n_branches, cut="spread")
    assert len(set(counts)) == n_branches and counts[0] == 0 and counts[-1] == 10
    assert spacing_holds(counts, n_branches)


def test_noisy_drops_make_the_gaps_rule_keep_near_duplicates_but_not_the_default() -> None:
    assert kept(NOISY, 4, cut="gaps") == [0, 7, 8, 10]  # top-7, top-8 and all: near-duplicates
    assert kept(NOISY, 4) == [0, 3, 7, 10]


def test_one_clear_drop_is_cut_at_and_the_other_cuts_spread_around_it() -> None:
    relevance = [1.0, 0.99, -0.5, -0.51, -0.52, -0.53, -0.54, -0.55, -0.56, -0.57]
    assert kept(relevance, 3) == [0, 2, 10]
    assert kept(relevance, 4) == [0, 2, 6, 10]  # the rest spreads over the 8 below the drop
    assert kept(relevance, 4, cut="spread") == [0, 3, 7, 10]


def test_a_diverged_auxiliary_is_a_clear_drop() -> None:
    relevance = [0.5, 0.49, 0.48, 0.47, 0.46, 0.45, 0.44, 0.43, 0.42, float("-inf")]
    assert kept(relevance, 3) == [0, 9, 10]


def test_gaussian_noise_rarely_looks_like_a_clear_drop() -> None:
    rng = random.Random(0)
    draws = [sorted((rng.gauss(0, 1) for _ in range(10)), reverse=True) for _ in range(400)]
    fooled = sum(kept(scores, 4) != [0, 3, 7, 10] for scores in draws)
    assert fooled / len(draws) < 0.08  # the factor is calibrated for ≈ 5 %


@pytest.mark.parametrize("cut", CUT_RULES)
@pytest.mark.parametrize("seed", range(5))
def test_every_rule_keeps_distinct_nested_branches(cut: str, seed: int) -> None:
    rng = random.Random(seed)
    relevance = sorted((rng.random() for _ in range(10)), reverse=True)
    for n_branches in range(2, 12):
        counts = kept(relevance, n_branches, cut)
        assert counts == sorted(set(counts)) and len(counts) == n_branches


def test_spread_cuts_fill_segments_evenly() -> None:
    assert spread_cuts(10, 2) == [3, 7]
    assert spread_cuts(10, 9) == list(range(1, 10))
    assert spread_cuts(10, 2, fixed=[5]) == [3, 8]
    assert spread_cuts(5, 1) == [3]


def test_keep_lists_the_kept_top_k_counts() -> None:
    plan = make_plan("pruned", target="t", ranked_auxiliaries=AUX, n_branches=None, keep=[0, 3, 5])
    assert [b.name for b in plan] == ["target", "target+top3", "all"]
    assert plan[1].tasks == ("t", "a", "b", "c")


@pytest.mark.parametrize(
    ("keep", "n", "match"),
    [
        ([0, 3], None, "from 0 to 5"),
        ([1, 3, 5], None, "from 0 \\(target only\\)"),
        ([0, 3, 3, 5], None, "increasing"),
        ([0, 3, 5], 4, "3 \\(the length of keep\\)"),
    ],
)
def test_bad_keep_lists_are_config_errors(keep: list[int], n: int | None, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        make_plan("pruned", target="t", ranked_auxiliaries=AUX, n_branches=n, keep=keep)


def test_unknown_cut_rule_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="Parameter `cut` should be one of auto, gaps, spread"):
        make_plan("pruned", target="t", ranked_auxiliaries=AUX, n_branches=3, cut="even")


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
