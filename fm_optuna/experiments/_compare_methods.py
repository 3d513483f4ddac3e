"""``fm-optuna compare-methods``: every method on the same problem, budget and seeds.

For each target (one problem per target) and each seed, :func:`fm_optuna.experiments.run_methods`
trains the methods and the per-task STL references; this module aggregates over seeds (mean ± std)
and, when several targets ran, over targets, and saves the tables as CSV and JSON.

What is reported, per target and method (means over seeds; see ``_run_methods`` for
the definitions): the target's test metric, every task's test metric, TG of the target and of every
task the method's model serves, Δm, and WNT flags (mean TG < 0); per target and task, the SNT flag
(max over the multi-task methods of mean TG < 0). Across targets: ``delta_m_targets``, the mean
over targets of the method's relative improvement on the target — the paper's Δm for methods that
train one model per target (PTFT, GCS, Auto-λ, ForkMerge) when the targets cover every task.

Example:
    >>> report = compare_methods([problem], config, ["stl", "ew"], seeds=[0])  # doctest: +SKIP
    >>> report.rows()[0]["method"]  # doctest: +SKIP
    'stl'
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fm_optuna._results import save_table
from fm_optuna.config import ForkMergeConfig
from fm_optuna.core._events import EventStream, Observer, RunFinished, RunSummary
from fm_optuna.errors import invalid, one_of
from fm_optuna.experiments._run_methods import (
    METHODS,
    REFERENCES,
    Comparison,
    method_kind,
    run_methods,
)
from fm_optuna.problem._tasks import Problem, describe_problem

ObserverFactory = Callable[[str, int], Sequence[Observer]]  # (target, seed) -> observers


def parse_methods(text: str) -> tuple[str, ...]:
    """``"stl,ew,forkmerge"`` (or ``"all"``) as a checked tuple of method names."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if names == ["all"]:
        return tuple(sorted(METHODS, key=lambda m: (m != "stl", m == "forkmerge")))
    if not names:
        raise invalid("methods", text, "a comma-separated list of " + ", ".join(METHODS))
    for name in names:
        if name not in METHODS:
            raise one_of("methods", name, METHODS)
    return tuple(dict.fromkeys(names))


@dataclass
class MethodRun:
    """One (target, seed) run of every method."""

    target: str
    seed: int
    comparison: Comparison


class _Finished(Observer):
    def __init__(self, callback: Callable[[str, int, str, RunSummary], None]) -> None:
        self.callback = callback
        self.target, self.seed = "", 0

    def on_run_finished(self, event: RunFinished) -> None:
        if event.status == "COMPLETE":  # a failed run raises out of compare_methods instead
            self.callback(self.target, self.seed, event.run, event.summary)


def _mean(values: Sequence[float]) -> float | None:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.mean(finite) if finite else None


def _std(values: Sequence[float]) -> float | None:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.stdev(finite) if len(finite) > 1 else (0.0 if finite else None)


@dataclass
class MethodsComparison:
    """Every (target, seed) comparison plus the tables derived from them."""

    config: dict[str, Any]
    methods: tuple[str, ...]
    metrics: dict[str, str]  # task -> its primary metric
    runs: list[MethodRun] = field(default_factory=list)

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(run.target for run in self.runs))

    def _of(self, target: str) -> list[Comparison]:
        return [run.comparison for run in self.runs if run.target == target]

    def rows(self) -> list[dict[str, Any]]:
        """One row per (target, method), means and standard deviations over seeds."""
        rows = []
        for target in self.targets:
            comparisons = self._of(target)
            tasks = list(comparisons[0].results[0].test)
            for method in self.methods:
                results = [c.result(method) for c in comparisons]
                tg = _mean([r.tg for r in results])  # type: ignore[misc]
                row: dict[str, Any] = {
                    "target": target,
                    "method": method,
                    "kind": results[0].kind,
                    "seeds": len(results),
                    "metric": results[0].target_metric,
                    "target_test_mean": _mean([r.target_test for r in results]),
                    "target_test_std": _std([r.target_test for r in results]),
                    "target_val_mean": _mean([r.target_val for r in results]),
                    "tg_mean": tg,
                    "tg_std": _std([r.tg for r in results]),  # type: ignore[misc]
                    "delta_m_mean": _mean([r.delta_m for r in results]),  # type: ignore[misc]
                    "delta_m_std": _std([r.delta_m for r in results]),  # type: ignore[misc]
                    "wnt": None if tg is None or results[0].kind == "single-task" else tg < 0,
                    "seconds_mean": _mean([r.seconds for r in results]),
                }
                for task in tasks:
                    metric = self.metrics[task]
                    # The STL row stands for the per-task STL models: task k's STL reference.
                    measured = [
                        c.reference_metrics[task] if row["kind"] == "single-task" else r.test[task]
                        for c, r in zip(comparisons, results, strict=True)
                        if row["kind"] != "single-task" or task in c.reference_metrics
                    ]
                    row[f"test/{task}"] = _mean([m[metric] for m in measured])
                for task in tasks:
                    gains = [r.tg_tasks[task] for r in results if task in r.tg_tasks]
                    row[f"tg/{task}"] = _mean(gains)
                    mean = row[f"tg/{task}"]
                    row[f"wnt/{task}"] = (
                        None if mean is None or results[0].kind == "single-task" else mean < 0
                    )
                rows.append(row)
        return rows

    def snt(self) -> dict[str, dict[str, bool | None]]:
        """Per target and task: max over multi-task methods of the seed-mean TG < 0."""
        out: dict[str, dict[str, bool | None]] = {}
        rows = self.rows()
        for target in self.targets:
            tasks = list(self._of(target)[0].results[0].test)
            flags: dict[str, bool | None] = {}
            for task in tasks:
                gains = [
                    row[f"tg/{task}"]
                    for row in rows
                    if row["target"] == target
                    and row["kind"] == "multi-task"
                    and row[f"tg/{task}"] is not None
                ]
                flags[task] = max(gains) < 0 if gains else None
            out[target] = flags
        return out

    def across_targets(self) -> list[dict[str, Any]]:
        """Per method: Δm over the targets run (mean of the target's relative improvement)."""
        if len(self.targets) < 2:
            return []
        out = []
        for method in self.methods:
            per_target = []
            for target in self.targets:
                values = [c.result(method).relative.get(target) for c in self._of(target)]
                per_target.append(_mean([v for v in values if v is not None]))
            known = [v for v in per_target if v is not None]
            out.append(
                {
                    "method": method,
                    "kind": method_kind(method),
                    "targets": list(self.targets),
                    "delta_m_targets": statistics.mean(known)
                    if len(known) == len(per_target)
                    else None,
                    "relative_per_target": dict(zip(self.targets, per_target, strict=True)),
                }
            )
        return out

    def save(self, directory: str | Path) -> dict[str, Path]:
        rows = self.rows()
        result = {
            "config": self.config,
            "methods": list(self.methods),
            "table": rows,
            "snt": self.snt(),
            "across_targets": self.across_targets(),
            "runs": [
                {"target": r.target, "seed": r.seed, **r.comparison.to_dict()} for r in self.runs
            ],
        }
        return save_table(Path(directory), "methods", rows, result)


def compare_methods(
    problems: Sequence[Problem],
    config: ForkMergeConfig,
    methods: Sequence[str],
    seeds: Sequence[int],
    *,
    references: str = "tasks",
    observers: ObserverFactory | None = None,
    on_method: Callable[[str, int, str, RunSummary], None] | None = None,
) -> MethodsComparison:
    """Run ``methods`` on every problem (one per target) for every seed.

    Args:
        problems: One problem per target (their targets must differ).
        config: The shared budget and ForkMerge settings; ``seed`` is replaced by each seed.
        methods: Registered method names (``fm_optuna.experiments._run_methods.METHODS``).
        seeds: Seeds of model initialisation and data order.
        references: ``tasks`` (STL for every task: Δm over all tasks) or ``target``.
        observers: ``(target, seed) -> observers`` for each run, e.g. MLflow tracking.
        on_method: Called with ``(target, seed, method, summary)`` after each method completes
            (``summary``: its :class:`~fm_optuna.core.RunSummary`).
    """
    for method in methods:
        if method not in METHODS:
            raise one_of("methods", method, METHODS)
    if not methods:
        raise invalid("methods", "", "a comma-separated list of " + ", ".join(METHODS))
    if references not in REFERENCES:
        raise one_of("references", references, REFERENCES)
    if not seeds:
        raise invalid("seeds", 0, "a positive integer")
    if not problems:
        raise invalid("targets", "", "at least one target")
    targets = [problem.target for problem in problems]
    if len(set(targets)) != len(targets):
        raise invalid("targets", ",".join(targets), "distinct targets")
    report = MethodsComparison(
        config={
            **config.as_params(),
            "seeds": list(seeds),
            "references": references,
            **{k: v for k, v in describe_problem(problems[0]).items() if k != "target"},
            "targets": targets,
        },
        methods=tuple(methods),
        metrics={task.name: task.metric for task in problems[0].tasks},
    )
    for problem in problems:
        for seed in seeds:
            finished = _Finished(on_method or (lambda *_: None))
            finished.target, finished.seed = problem.target, seed
            extra = list(observers(problem.target, seed)) if observers else []
            events = EventStream([finished, *extra])
            try:
                comparison = run_methods(
                    problem, replace(config, seed=seed), methods, events, references=references
                )
            finally:
                events.close()
            report.runs.append(MethodRun(problem.target, seed, comparison))
    return report


__all__ = ["MethodRun", "MethodsComparison", "compare_methods", "parse_methods"]
