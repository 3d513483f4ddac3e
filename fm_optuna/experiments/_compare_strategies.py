"""``fm-optuna compare``: the same ForkMerge training once per inner strategy and seed.

Δt, L, the seeds and (per seed) the auxiliary ranking are shared, so only the merge search
differs: the ranking is measured once per seed and handed to every strategy's run whole, order
and relevance, so the cut rule (``auto``, ``gaps``) sees the scores a single run would. The
table reports target validation/test score, inner evaluations per merge, merge seconds per round,
total seconds, and the mean L1 distance between a strategy's Λ and grid's Λ at the same round
(``None`` when grid is not compared).
"""

from __future__ import annotations

import copy
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fm_optuna._results import save_table
from fm_optuna.config import ForkMergeConfig
from fm_optuna.core._events import EventStream, Observer
from fm_optuna.core._loop import run_forkmerge
from fm_optuna.core._ranking import Ranking, plan_ranking
from fm_optuna.core._training import seeded_model, target_score
from fm_optuna.errors import invalid, one_of
from fm_optuna.problem._tasks import Problem, describe_problem, for_plan
from fm_optuna.search.strategies import STRATEGIES


@dataclass
class StrategyRun:
    strategy: str
    seed: int
    val: float
    test: float
    evaluations_per_merge: float
    merge_seconds_per_round: float
    seconds: float
    lambdas: list[list[float]]
    branches: list[str] = field(default_factory=list)  # the kept branches, target only first


@dataclass
class StrategyComparison:
    config: dict[str, Any]
    runs: list[StrategyRun] = field(default_factory=list)

    def rows(self) -> list[dict[str, Any]]:
        grid = {r.seed: np.array(r.lambdas) for r in self.runs if r.strategy == "grid"}
        rows = []
        for strategy in dict.fromkeys(r.strategy for r in self.runs):
            runs = [r for r in self.runs if r.strategy == strategy]
            distances = [
                float(np.abs(np.array(r.lambdas) - grid[r.seed]).sum(axis=1).mean())
                for r in runs
                if r.seed in grid
            ]
            rows.append(
                {
                    "strategy": strategy,
                    "seeds": len(runs),
                    "val_mean": statistics.mean(r.val for r in runs),
                    "val_std": _std([r.val for r in runs]),
                    "test_mean": statistics.mean(r.test for r in runs),
                    "test_std": _std([r.test for r in runs]),
                    "evaluations_per_merge": statistics.mean(r.evaluations_per_merge for r in runs),
                    "merge_seconds_per_round": statistics.mean(
                        r.merge_seconds_per_round for r in runs
                    ),
                    "total_seconds": statistics.mean(r.seconds for r in runs),
                    "l1_from_grid": statistics.mean(distances) if distances else None,
                }
            )
        return rows

    def save(self, directory: Path) -> dict[str, Path]:
        rows = self.rows()
        result = {"config": self.config, "table": rows, "runs": [r.__dict__ for r in self.runs]}
        paths = save_table(directory, "strategies", rows, result)
        paths["plot"] = directory / "strategies.png"
        seeds = max((row["seeds"] for row in rows), default=1)
        metric = self.config.get("target_metric", "score")
        plot_strategies(rows, paths["plot"], metric=metric, seeds=seeds)
        return paths


def _std(values: Sequence[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def plot_strategies(
    rows: list[dict[str, Any]], path: Path, *, metric: str, seeds: int | None = None
) -> None:
    """Target test score against inner evaluations per merge, one point per strategy, legible
    at MLflow's artifact-preview width (plain tick labels, names in a legend, no clipping)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    figure, axis = plt.subplots(figsize=(6.4, 4), layout="constrained")
    for row in rows:
        axis.errorbar(
            row["evaluations_per_merge"],
            row["test_mean"],
            yerr=row["test_std"] if (seeds or 0) > 1 else None,
            fmt="o",
            capsize=4,
            markersize=7,
            label=row["strategy"],
        )
    axis.set_xscale("log")
    axis.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    axis.xaxis.set_major_formatter(ScalarFormatter())
    axis.xaxis.set_minor_formatter(NullFormatter())
    axis.margins(x=0.15, y=0.2)
    axis.set_xlabel("inner evaluations per merge (log scale)")
    spread = f"mean ± std over {seeds} seeds" if (seeds or 0) > 1 else "one seed"
    axis.set_ylabel(f"target test {metric} ({spread})")
    axis.set_title("Merge-search strategies: score vs. cost")
    axis.grid(alpha=0.3)
    axis.legend(loc="best", fontsize="small", frameon=False)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _run_strategy(
    problem: Problem, config: ForkMergeConfig, events: EventStream, ranking: Ranking
) -> StrategyRun:
    """One ForkMerge run (it ends itself in ``events``, as every ForkMerge run does); its
    seconds here include the ranking measured once for the seed."""
    result = run_forkmerge(problem, config, events, ranking=ranking)
    target = problem.task(problem.target)  # the problem's own target, under the joint plan too
    seconds = result.seconds + ranking.seconds
    return StrategyRun(
        strategy=config.strategy,
        seed=config.seed,
        val=result.summary.val[target.name][target.metric],
        test=result.summary.test[target.name][target.metric],
        evaluations_per_merge=statistics.mean(d.n_trials for d in result.decisions),
        merge_seconds_per_round=statistics.mean(d.seconds for d in result.decisions),
        seconds=seconds,
        lambdas=[list(w) for w in result.lambda_history],
        branches=[branch.name for branch in result.branches],
    )


def compare_strategies(
    problem: Problem,
    base: ForkMergeConfig,
    strategies: Sequence[str],
    seeds: Sequence[int],
    *,
    observers: Callable[[str, int], Sequence[Observer]] | None = None,
    on_run: Callable[[StrategyRun], None] | None = None,
) -> StrategyComparison:
    for strategy in strategies:
        if strategy not in STRATEGIES:
            raise one_of("strategies", strategy, STRATEGIES)
    if not strategies:
        raise invalid("strategies", "", "a comma-separated list of " + ", ".join(STRATEGIES))
    target = problem.task(problem.target)
    comparison = StrategyComparison(
        config={
            **base.as_params(),
            "seeds": list(seeds),
            "strategies": list(strategies),
            "target_metric": target.metric,
            **describe_problem(problem),
        }
    )
    for seed in seeds:
        seeded = ForkMergeConfig(**{**base.__dict__, "seed": seed})
        # The ranking depends on the seed only: measure it once (on the problem the plan trains,
        # from the same θ_0 as the runs) and give it whole to every strategy.
        planned = for_plan(problem, seeded.plan)
        initial = copy.deepcopy(seeded_model(planned, seed).state_dict())
        ranking = plan_ranking(planned, seeded, initial)
        for strategy in strategies:
            config = ForkMergeConfig(**{**seeded.__dict__, "strategy": strategy})
            events = EventStream(observers(strategy, seed) if observers else ())
            try:
                run = _run_strategy(problem, config, events, ranking)
            finally:
                events.close()
            comparison.runs.append(run)
            if on_run is not None:
                on_run(run)
    return comparison


__all__ = [
    "StrategyComparison",
    "StrategyRun",
    "compare_strategies",
    "plot_strategies",
    "target_score",
]
