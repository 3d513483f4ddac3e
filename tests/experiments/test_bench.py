"""``fm-optuna bench``'s report: the default search against full and pruned evaluation."""

from __future__ import annotations

import math

import pytest
import torch

from fm_optuna.config import ForkMergeConfig
from fm_optuna.experiments._bench import run_bench


@pytest.fixture(scope="module")
def report() -> dict[str, object]:
    from fm_optuna.benchmarks import build_problem

    torch.set_num_threads(1)
    problem = build_problem("digits", target="uci", batch_size=8)
    config = ForkMergeConfig(
        total_steps=60, dt=20, branches=3, ranking="given", strategy="tpe", merge_trials=12
    )
    return run_bench(problem, config)


def test_the_default_search_decides_as_full_evaluation_for_fewer_forwards(
    report: dict[str, object],
) -> None:
    ratios = report["ratios"]
    assert isinstance(ratios, dict)
    share = ratios["merge-search share"]
    assert "identical to full evaluation" in share["what"]
    assert 0 < ratios["default / full validation passes"]["value"] < 1
    for key in ("merge-search share, full evaluation", "pruned / full merge-search share"):
        assert math.isfinite(ratios[key]["value"]) and ratios[key]["value"] > 0


def test_every_timing_is_a_positive_number(report: dict[str, object]) -> None:
    seconds = report["seconds"]
    assert isinstance(seconds, dict)
    for key in ("forkmerge", "search", "search_full", "search_pruned", "branches_alone"):
        assert seconds[key] > 0, key


def test_the_methods_bench_reports_each_method_against_ew() -> None:
    from fm_optuna.config import ForkMergeConfig
    from fm_optuna.experiments._bench_methods import measure_methods
    from tests.conftest import ToyProblem

    report = measure_methods(
        ToyProblem(), ForkMergeConfig(dt=5, total_steps=10), ["itmtl", "ew"], steps=5, repeats=1
    )
    assert list(report["over_ew"]) == ["ew", "itmtl"] and report["over_ew"]["ew"] == 1.0
    assert report["over_ew"]["itmtl"] > 1.0  # candidates' lookaheads cost more than one backward
    assert all(s > 0 for s in report["seconds_per_step"].values())
