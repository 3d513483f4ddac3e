"""``fm-optuna bench``: what ForkMerge adds on top of training its branches, measured in one run.

Every figure is a ratio of wall times measured in the same process, so it is comparable across
machines; with ``repeats`` > 1 each timing keeps its fastest repetition.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Any

from fm_optuna.baselines import make_baseline, run_baseline
from fm_optuna.forkmerge import (
    ForkMergeConfig,
    data_generator,
    plan_branches,
    run_forkmerge,
    seeded_model,
)
from fm_optuna.tasks import Problem
from fm_optuna.training import WeightedSum, make_optimizer, train


def train_branches_alone(problem: Problem, config: ForkMergeConfig) -> float:
    """Seconds to train the plan's L branches for T steps each with no fork, merge or search."""
    model = seeded_model(problem, config.seed)
    initial = copy.deepcopy(model.state_dict())
    branches, _ = plan_branches(
        problem, ForkMergeConfig(**{**config.__dict__, "ranking": "given"}), initial
    )
    started = time.perf_counter()
    for index, branch in enumerate(branches):
        model.load_state_dict(initial)
        train(
            model,
            make_optimizer(model, config.lr),
            problem,
            WeightedSum(branch.weights),
            steps=config.total_steps,
            generator=data_generator(problem, config.seed, index),
            log_every=config.log_every,
            on_losses=lambda step, losses: None,
        )
    return time.perf_counter() - started


def _fastest(repeats: int, measure: Callable[[], Any]) -> Any:
    return min(
        (measure() for _ in range(repeats)), key=lambda r: r[0] if isinstance(r, tuple) else r
    )


def run_bench(problem: Problem, config: ForkMergeConfig, *, repeats: int = 1) -> dict[str, Any]:
    def forkmerge() -> tuple[float, Any]:
        result = run_forkmerge(problem, config)
        return result.seconds - result.timings["ranking"], result

    def equal_weighting() -> float:
        return run_baseline(make_baseline("ew"), problem, config).seconds

    alone = _fastest(repeats, lambda: train_branches_alone(problem, config))
    fm_seconds, fm = _fastest(repeats, forkmerge)
    ew = _fastest(repeats, equal_weighting)
    t = fm.timings
    overhead = {k: t[k] for k in ("evaluate", "search", "merge")}
    return {
        "setup": (
            f"{problem.name} target={problem.target} T={config.total_steps} Δt={config.dt} "
            f"L={len(fm.branches)} strategy={config.strategy} merge_trials={config.merge_trials} "
            f"rounds={config.rounds} device={problem.device}"
        ),
        "ratios": {
            "forkmerge / branches alone": {
                "value": fm_seconds / alone,
                "goal": 1.10,
                "what": "ForkMerge wall time (pre-pass excluded) over training its L branches T steps alone",
            },
            "merge-search share": {
                "value": t["search"] / fm_seconds,
                "goal": 0.05,
                "what": "share of the ForkMerge run spent in the inner studies (evaluations included)",
            },
            "forkmerge / ew": {
                "value": fm_seconds / ew,
                "goal": None,
                "what": "ForkMerge over EW (one model) wall time",
            },
            "ranking pre-pass / forkmerge": {
                "value": t["ranking"] / fm_seconds,
                "goal": None,
                "what": f"cost of the {fm.ranking.method} ranking relative to the ForkMerge run",
            },
        },
        "seconds": {
            "branches_alone": alone,
            "forkmerge": fm_seconds,
            "ew": ew,
            **overhead,
            "train": t["train"],
            "ranking": t["ranking"],
        },
    }
