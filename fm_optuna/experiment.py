"""Train STL, EW and ForkMerge (or any registered methods) on one problem with one budget."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from fm_optuna.baselines import BASELINES, make_baseline, run_baseline
from fm_optuna.errors import one_of
from fm_optuna.events import EventStream, RunFinished
from fm_optuna.forkmerge import ForkMergeConfig, ForkMergeResult, run_forkmerge
from fm_optuna.tasks import Problem

METHODS = ("forkmerge", *BASELINES)


@dataclass
class MethodResult:
    method: str
    val: dict[str, dict[str, float]]
    test: dict[str, dict[str, float]]
    target_metric: str
    target_val: float
    target_test: float
    seconds: float
    tg: float | None = None  # test transfer gain over STL, in the metric's units, + is better

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "target_metric": self.target_metric,
            "target_val": self.target_val,
            "target_test": self.target_test,
            "tg": self.tg,
            "seconds": self.seconds,
            "val": self.val,
            "test": self.test,
        }


@dataclass
class Comparison:
    problem: dict[str, Any]
    config: ForkMergeConfig
    results: list[MethodResult] = field(default_factory=list)
    forkmerge: ForkMergeResult | None = None

    def result(self, method: str) -> MethodResult:
        return next(r for r in self.results if r.method == method)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "problem": self.problem,
            "config": self.config.as_params(),
            "results": [r.to_dict() for r in self.results],
        }
        if self.forkmerge is not None:
            fm = self.forkmerge
            out["forkmerge"] = {
                "branches": {b.name: dict(b.weights) for b in fm.branches},
                "ranking": {
                    "method": fm.ranking.method,
                    "order": list(fm.ranking.order),
                    "relevance": None
                    if fm.ranking.relevance is None
                    else list(fm.ranking.relevance),
                    "seconds": fm.ranking.seconds,
                },
                "final_round": fm.final_round,
                "timings": fm.timings,
                "merges": [
                    {
                        "round": i + 1,
                        "step": step,
                        "lambda": list(d.weights),
                        "score": d.score,
                        "n_trials": d.n_trials,
                        "search_seconds": d.seconds,
                        "fallback": d.fallback,
                    }
                    for i, (step, d) in enumerate(zip(fm.steps, fm.decisions, strict=True))
                ],
            }
        return out


def evaluate_all(problem: Problem, model: nn.Module) -> tuple[dict[str, Any], dict[str, Any]]:
    return problem.evaluate(model, "val"), problem.evaluate(model, "test")


def run_methods(
    problem: Problem,
    config: ForkMergeConfig,
    methods: Sequence[str] = ("stl", "ew", "forkmerge"),
    events: EventStream | None = None,
) -> Comparison:
    """Train every method with the same seed and budget T; TG is measured against STL."""
    for method in methods:
        if method not in METHODS:
            raise one_of("method", method, METHODS)
    events = events or EventStream()
    comparison = Comparison(problem=problem.describe(), config=config)
    target = problem.task(problem.target)
    for method in methods:
        started = time.perf_counter()
        if method == "forkmerge":
            fm = run_forkmerge(problem, config, events)
            comparison.forkmerge, model = fm, fm.model
        else:
            model = run_baseline(make_baseline(method), problem, config, events).model
        val, test = evaluate_all(problem, model)
        seconds = time.perf_counter() - started
        result = MethodResult(
            method=method,
            val=val,
            test=test,
            target_metric=target.metric,
            target_val=val[target.name][target.metric],
            target_test=test[target.name][target.metric],
            seconds=seconds,
        )
        comparison.results.append(result)
        events.emit(RunFinished(run=method, summary=result.to_dict(), seconds=seconds))
    if "stl" in methods:
        stl = target.score(comparison.result("stl").test[target.name])
        for result in comparison.results:
            result.tg = target.score(result.test[target.name]) - stl
    return comparison
