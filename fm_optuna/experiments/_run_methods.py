"""Train STL, EW and ForkMerge (or any registered methods) on one problem with one budget.

Besides each method's per-task validation/test metrics, a :class:`Comparison` reports the paper's
measures against single-task learning (STL):

- **TG** (Def. 2.1), per task k: score_m(k) − score_STL_k(k) on the test split, in the units of k's
  primary metric and oriented so that + is better. ``MethodResult.tg`` is the target's.
- **Δm** (Appendix C.1): (1/|S|) Σ_{k∈S} (−1)^{z_k} (M_{m,k} − M_{b,k}) / M_{b,k} with M the
  primary test metric and z_k = 1 for lower-is-better metrics; reported as a fraction (×100 for %).
- **WNT** (Def. 2.2), per method and task k ∈ S: TG_k < 0.
- **SNT** (Def. 2.3), per task k: max TG_k over the ``multi-task`` methods run (EW, UW, DWA, RLW and
  the gradient methods, each one choice of task weighting λ) < 0. This is SNT *relative to the
  weightings tried*: the definition's max over every λ > 0 cannot be run, so a flag says "no
  weighting we tried beats STL on k". ``None`` when no multi-task method ran.

The reference M_{b,k} is **STL trained with task k as its target**, with the same seed, budget,
optimizer and data splits as the compared methods (for digits, task k keeps the split layout it
has in this problem). ``references="target"`` trains no extra model: the ``stl`` method (when it
runs) is the target's reference and S = {target}. ``references="tasks"`` also trains STL for
every other task, so that S covers every task a method's model serves:

- ``multi-task`` methods (one model for all tasks): S = every task;
- ``target-specific`` methods (PTFT, GCS, Auto-λ, ForkMerge: the model is trained for the target):
  S = {target}; the paper's Δm for them averages this over runs with every task as the target
  (``fm-optuna compare-methods --targets``);
- STL stands for the per-task STL models themselves: TG = 0 and Δm = 0 by definition.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from fm_optuna.baselines import BASELINES, SingleTask, make_baseline, run_baseline
from fm_optuna.config import ForkMergeConfig
from fm_optuna.core._checkpoints import Checkpointer
from fm_optuna.core._events import EventStream, TransferMeasured
from fm_optuna.core._loop import ForkMergeResult, run_forkmerge
from fm_optuna.errors import one_of
from fm_optuna.problem._tasks import Problem, Split, TaskMetrics, describe_problem, for_plan

if TYPE_CHECKING:
    import torch

METHODS = ("forkmerge", *BASELINES)
REFERENCES = ("target", "tasks")


def method_kind(method: str) -> str:
    """``single-task``, ``multi-task`` or ``target-specific`` (ForkMerge is target-specific)."""
    return "target-specific" if method == "forkmerge" else BASELINES[method].kind


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
    kind: str = "multi-task"
    tg_tasks: dict[str, float] = field(default_factory=dict)  # TG_k for k ∈ S
    relative: dict[str, float] = field(default_factory=dict)  # Δm's term for k ∈ S
    delta_m: float | None = None  # mean of ``relative`` (a fraction; × 100 for %)
    wnt: dict[str, bool] = field(default_factory=dict)  # TG_k < 0 for k ∈ S

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "kind": self.kind,
            "target_metric": self.target_metric,
            "target_val": self.target_val,
            "target_test": self.target_test,
            "tg": self.tg,
            "delta_m": self.delta_m,
            "tg_tasks": self.tg_tasks,
            "relative": self.relative,
            "wnt": self.wnt,
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
    references: str = "target"
    # Task → test metrics of STL trained with that task as target (the TG / Δm reference).
    reference_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    reference_seconds: float = 0.0  # training of the extra STL references (not the stl method)
    # Task → SNT flag over the multi-task methods (None: no multi-task method or no reference).
    snt: dict[str, bool | None] = field(default_factory=dict)

    def result(self, method: str) -> MethodResult:
        return next(r for r in self.results if r.method == method)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "problem": self.problem,
            "config": self.config.as_params(),
            "references": self.references,
            "reference_metrics": self.reference_metrics,
            "reference_seconds": self.reference_seconds,
            "snt": self.snt,
            "snt_methods": [r.method for r in self.results if r.kind == "multi-task"],
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
                # Where a --resume continued (None: one uninterrupted run); the method's
                # seconds include the time before the resume.
                "resumed": None
                if not fm.resumed_from_round
                else {
                    "after_round": fm.resumed_from_round,
                    "at_step": fm.resumed_at_step,
                    "seconds_before": fm.seconds_before_resume,
                },
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


class Retargeted(Problem):
    """The same problem (data, splits, model) with another task as the target.

    Used to train the per-task STL references of Δm without rebuilding the benchmark, so every
    task's reference is measured on exactly the splits the compared models are measured on.
    """

    def __init__(self, base: Problem, target: str) -> None:
        if target not in base.task_names:
            raise one_of("target", target, base.task_names)
        self.base = base
        self.name = base.name
        self.tasks = base.tasks
        self.target = target
        self.device = base.device

    def make_model(self) -> nn.Module:
        return self.base.make_model()

    def task_losses(
        self, model: nn.Module, tasks: Sequence[str], generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        return self.base.task_losses(model, tasks, generator)

    def evaluate(
        self, model: nn.Module, split: Split, tasks: Sequence[str] | None = None
    ) -> dict[str, TaskMetrics]:
        return self.base.evaluate(model, split, tasks)

    def shared_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return self.base.shared_parameters(model)

    def describe(self) -> dict[str, object]:
        return {**self.base.describe(), "target": self.target}


def stl_reference(problem: Problem, task: str, config: ForkMergeConfig) -> dict[str, float]:
    """Test metrics of ``task`` for STL trained with ``task`` as its target (same seed/budget)."""
    view = Retargeted(problem, task)
    return dict(run_baseline(SingleTask(), view, config).summary.test[task])


def relative_improvement(reference: float, value: float, *, higher_is_better: bool) -> float:
    """One task's term of Δm: (−1)^z (M_m − M_b) / M_b (NaN when M_b = 0)."""
    if reference == 0:
        return math.nan
    sign = 1.0 if higher_is_better else -1.0
    return sign * (value - reference) / reference


def score_against_references(
    result: MethodResult, problem: Problem, references: Mapping[str, Mapping[str, float]]
) -> None:
    """Fill TG, Δm's terms, Δm and WNT of ``result`` from the per-task STL references."""
    if result.kind == "target-specific":
        tasks = [problem.target] if problem.target in references else []
    else:
        tasks = [task for task in problem.task_names if task in references]
    for name in tasks:
        if result.kind == "single-task":  # the per-task STL models are the references
            result.tg_tasks[name], result.relative[name] = 0.0, 0.0
            continue
        task = problem.task(name)
        result.tg_tasks[name] = task.score(result.test[name]) - task.score(references[name])
        result.relative[name] = relative_improvement(
            references[name][task.metric],
            result.test[name][task.metric],
            higher_is_better=task.higher_is_better,
        )
        result.wnt[name] = result.tg_tasks[name] < 0
    result.tg = result.tg_tasks.get(problem.target)
    if tasks:
        result.delta_m = sum(result.relative.values()) / len(tasks)


def strong_negative_transfer(
    problem: Problem, results: Sequence[MethodResult]
) -> dict[str, bool | None]:
    """Per task: max TG over the multi-task methods < 0 (``None`` if none measured the task)."""
    flags: dict[str, bool | None] = {}
    for task in problem.task_names:
        gains = [r.tg_tasks[task] for r in results if r.kind == "multi-task" and task in r.tg_tasks]
        flags[task] = max(gains) < 0 if gains else None
    return flags


def _run_forkmerge(
    problem: Problem,
    config: ForkMergeConfig,
    events: EventStream,
    checkpoint: Path | None,
    resume_from: Mapping[str, Any] | None,
    replicas: Sequence[Problem],
) -> ForkMergeResult:
    """ForkMerge, checkpointed at every merge to ``checkpoint``, continuing ``resume_from``."""
    if checkpoint is not None:
        events = EventStream([Checkpointer(checkpoint), *events.observers])
    return run_forkmerge(problem, config, events, resume_from=resume_from, replicas=replicas)


def run_methods(
    problem: Problem,
    config: ForkMergeConfig,
    methods: Sequence[str] = ("stl", "ew", "forkmerge"),
    events: EventStream | None = None,
    *,
    references: str = "target",
    checkpoint: Path | None = None,
    resume_from: Mapping[str, Any] | None = None,
    replicas: Sequence[Problem] = (),
) -> Comparison:
    """Train every method with the same seed and budget T; TG and Δm are measured against STL.

    Every method's run ends itself (``RunFinished`` with its summary); when a reference is known
    (STL trains first when it is among ``methods``) ``TransferMeasured`` follows with its TG and
    Δm. ``references="tasks"`` first trains STL for every other
    task (silently: no events) so that Δm covers every task; see the module docstring.
    ForkMerge writes ``checkpoint`` at every merge and continues the snapshot ``resume_from``
    (:func:`~fm_optuna.core.load_checkpoint`) when given, its branches on ``problem`` and its
    ``replicas`` (the problem on further devices; the baselines train on ``problem``'s).
    """
    for method in methods:
        if method not in METHODS:
            raise one_of("method", method, METHODS)
    if references not in REFERENCES:
        raise one_of("references", references, REFERENCES)
    problem = for_plan(problem, config.plan)  # every method is judged on the same target
    events = events or EventStream()
    comparison = Comparison(problem=describe_problem(problem), config=config, references=references)
    target = problem.task(problem.target)
    reference_metrics = comparison.reference_metrics
    if references == "tasks":
        started = time.perf_counter()
        for task in problem.task_names:
            if task != target.name or "stl" not in methods:
                reference_metrics[task] = stl_reference(problem, task, config)
        comparison.reference_seconds = time.perf_counter() - started
    by_method: dict[str, MethodResult] = {}
    for method in sorted(methods, key=lambda m: m != "stl"):
        # Each run ends itself (RunFinished, FAIL with the reason when it raises).
        if method == "forkmerge":
            fm = _run_forkmerge(problem, config, events, checkpoint, resume_from, replicas)
            comparison.forkmerge, summary = fm, fm.summary
        else:
            summary = run_baseline(make_baseline(method), problem, config, events).summary
        if method == "stl":
            reference_metrics[target.name] = dict(summary.test[target.name])
        result = MethodResult(
            method=method,
            val={task: dict(metrics) for task, metrics in summary.val.items()},
            test={task: dict(metrics) for task, metrics in summary.test.items()},
            target_metric=target.metric,
            target_val=summary.val[target.name][target.metric],
            target_test=summary.test[target.name][target.metric],
            seconds=summary.seconds,
            kind=method_kind(method),
        )
        score_against_references(result, problem, reference_metrics)
        by_method[method] = result
        if reference_metrics:
            events.emit(
                TransferMeasured(
                    run=method,
                    tg=result.tg,
                    delta_m=result.delta_m,
                    tg_tasks=dict(result.tg_tasks),
                    relative=dict(result.relative),
                )
            )
    comparison.results = [by_method[method] for method in dict.fromkeys(methods)]
    comparison.snt = strong_negative_transfer(problem, comparison.results)
    return comparison
