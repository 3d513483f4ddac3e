"""The fork → train → merge loop (Algorithms 1, 2 and 4), emitting events.

Every Δt optimizer steps the shared model θ* is forked into the plan's branches, each branch is
trained Δt steps on its task weights, and the branches are merged into θ* = Σ_b Λ_b θ_b with Λ
chosen by an inner Optuna study on the target's validation score. Δt and T count optimizer steps
of one branch.
"""

from __future__ import annotations

import copy
import functools
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from fm_optuna.branches import PLANS, Branch, default_branch_count, make_plan
from fm_optuna.errors import invalid, one_of
from fm_optuna.events import (
    BranchesEvaluated,
    EventStream,
    MergeCompleted,
    RunStarted,
    TrainingProgress,
)
from fm_optuna.merging import BranchStack
from fm_optuna.search import MergeDecision, search_merge
from fm_optuna.strategies import STRATEGIES, make_strategy
from fm_optuna.tasks import Problem, Split, for_plan
from fm_optuna.training import WeightedSum, make_optimizer, train

OPTIMIZER_POLICIES = ("keep", "reset", "average")
FINAL_MODELS = ("last", "best")
RANKINGS = ("prepass", "given", "affinity")


@dataclass(frozen=True)
class ForkMergeConfig:
    """Everything that defines a ForkMerge run; logged as run parameters and checkpointed.

    Attributes:
        dt: Merge interval Δt in optimizer steps.
        total_steps: Training budget T in optimizer steps (per branch).
        strategy: Merge-search strategy (``grid``, ``binary``, ``greedy``, ``tpe``, ``cmaes``,
            ``random``).
        merge_trials: Inner-study budget for the strategies that take one.
        grid_resolution: Lattice step of ``grid``.
        plan: ``pruned`` (Alg. 4), ``pairwise`` (Alg. 1/2) or ``joint`` (App. A.4).
        branches: L, the number of branches (``None``: the plan's default).
        ranking: ``prepass`` (short target+aux runs ranked by target validation, the official
            code) or ``given`` (the order of ``aux_order``, else the benchmark's task order).
        ranking_steps: Steps of each pre-pass run (``None``: Δt).
        aux_order: Explicit best-first order of the auxiliaries for ``ranking="given"``.
        optimizer_policy: What happens to optimizer state at a merge: ``keep`` (each branch keeps
            its moments, as the official code), ``reset`` or ``average`` (moments averaged by Λ).
        final: ``last`` merge or ``best``-validated merge is the final model.
        lr: Adam learning rate.
        seed: Seeds model initialisation, data order and every inner study.
        log_every: Steps between training-loss reports.
    """

    dt: int = 100
    total_steps: int = 600
    strategy: str = "grid"
    merge_trials: int = 20
    grid_resolution: float = 0.1
    plan: str = "pruned"
    branches: int | None = None
    ranking: str = "prepass"
    ranking_steps: int | None = None
    aux_order: tuple[str, ...] | None = None
    optimizer_policy: str = "keep"
    final: str = "last"
    lr: float = 1e-3
    seed: int = 0
    log_every: int = 25

    def __post_init__(self) -> None:
        if not isinstance(self.total_steps, int) or self.total_steps < 1:
            raise invalid("steps", self.total_steps, "a positive integer")
        if not isinstance(self.dt, int) or not 1 <= self.dt <= self.total_steps:
            raise invalid("dt", self.dt, f"an integer from 1 to steps ({self.total_steps})")
        if self.strategy not in STRATEGIES:
            raise one_of("strategy", self.strategy, STRATEGIES)
        if not isinstance(self.merge_trials, int) or self.merge_trials < 1:
            raise invalid("merge_trials", self.merge_trials, "a positive integer")
        if self.plan not in PLANS:
            raise one_of("plan", self.plan, PLANS)
        if self.ranking not in RANKINGS:
            raise one_of("ranking", self.ranking, RANKINGS)
        if self.ranking_steps is not None and self.ranking_steps < 1:
            raise invalid("ranking_steps", self.ranking_steps, "a positive integer")
        if self.optimizer_policy not in OPTIMIZER_POLICIES:
            raise one_of("optimizer_policy", self.optimizer_policy, OPTIMIZER_POLICIES)
        if self.final not in FINAL_MODELS:
            raise one_of("final", self.final, FINAL_MODELS)
        if not self.lr > 0:
            raise invalid("lr", self.lr, "a positive number")
        if self.log_every < 1:
            raise invalid("log_every", self.log_every, "a positive integer")
        make_strategy(self.strategy, resolution=self.grid_resolution)  # validates its options

    @property
    def rounds(self) -> int:
        return math.ceil(self.total_steps / self.dt)

    def as_params(self) -> dict[str, Any]:
        params = asdict(self)
        params["aux_order"] = ",".join(self.aux_order) if self.aux_order else None
        return params


@dataclass
class BranchRun:
    """A live branch: its weighting, model, optimizer and data stream."""

    branch: Branch
    model: nn.Module
    optimizer: torch.optim.Optimizer
    generator: torch.Generator


@dataclass
class Ranking:
    order: tuple[str, ...]
    relevance: tuple[float, ...] | None
    seconds: float
    method: str


@dataclass
class ForkMergeResult:
    model: nn.Module
    branches: list[Branch]
    decisions: list[MergeDecision]
    steps: list[int]
    ranking: Ranking
    final_round: int
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def lambda_history(self) -> list[tuple[float, ...]]:
        return [decision.weights for decision in self.decisions]


def target_score(
    problem: Problem, model: nn.Module, split: Split = "val"
) -> tuple[float, dict[str, float]]:
    """The target's validation score (higher is better) and its metrics."""
    metrics = problem.evaluate(model, split, [problem.target])[problem.target]
    return problem.task(problem.target).score(metrics), metrics


def seeded_model(problem: Problem, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return problem.make_model().to(problem.device)


def data_generator(problem: Problem, seed: int, stream: int) -> torch.Generator:
    """Independent, reproducible data order per (seed, stream)."""
    generator = torch.Generator(device=problem.device)
    generator.manual_seed(seed * 1_000_003 + stream)
    return generator


def rank_auxiliaries(
    problem: Problem, config: ForkMergeConfig, initial: Mapping[str, torch.Tensor]
) -> Ranking:
    """Best-first order of the auxiliaries (with relevance scores when measured)."""
    started = time.perf_counter()
    auxiliaries = problem.auxiliaries
    if config.ranking == "given" or len(auxiliaries) < 2:
        order = tuple(config.aux_order or auxiliaries)
        if sorted(order) != sorted(auxiliaries):
            raise invalid(
                "aux_order", ",".join(order), "a permutation of " + ", ".join(auxiliaries)
            )
        return Ranking(order, None, time.perf_counter() - started, "given")
    if config.ranking == "affinity":
        from fm_optuna.affinity import rank_by_affinity  # lazy: affinity imports this module

        return rank_by_affinity(problem, config, initial)
    steps = config.ranking_steps or config.dt
    scores: dict[str, float] = {}
    model = seeded_model(problem, config.seed)
    for index, aux in enumerate(auxiliaries):
        model.load_state_dict(initial)
        optimizer = make_optimizer(model, config.lr)
        rule = WeightedSum({problem.target: 1.0, aux: 1.0})
        generator = data_generator(problem, config.seed, 10_000 + index)
        train(model, optimizer, problem, rule, steps=steps, generator=generator)
        score, _ = target_score(problem, model)
        scores[aux] = score if math.isfinite(score) else -math.inf
    order = tuple(sorted(auxiliaries, key=lambda a: (-scores[a], auxiliaries.index(a))))
    return Ranking(order, tuple(scores[a] for a in order), time.perf_counter() - started, "prepass")


def _needs_order(config: ForkMergeConfig, n_aux: int) -> bool:
    """Only a pruned plan with intermediate branches depends on the auxiliaries' order."""
    n_branches = config.branches
    if config.plan == "pairwise" or n_aux < 2:
        return False
    if n_branches is None:
        n_branches = default_branch_count(n_aux + 1)
    return n_branches > 2


def plan_branches(
    problem: Problem, config: ForkMergeConfig, initial: Mapping[str, torch.Tensor]
) -> tuple[list[Branch], Ranking]:
    if config.ranking in ("prepass", "affinity") and not _needs_order(
        config, len(problem.auxiliaries)
    ):
        ranking = Ranking(tuple(problem.auxiliaries), None, 0.0, "not needed")
    else:
        ranking = rank_auxiliaries(problem, config, initial)
    branches = make_plan(
        "pruned" if config.plan == "joint" else config.plan,
        target=problem.target,
        ranked_auxiliaries=ranking.order,
        n_branches=config.branches,
        relevance=ranking.relevance,
    )
    return branches, ranking


def apply_optimizer_policy(
    runs: Sequence[BranchRun], weights: Sequence[float], policy: str, lr: float
) -> None:
    if policy == "keep":
        return
    if policy == "reset":
        for run in runs:
            run.optimizer = make_optimizer(run.model, lr)
        return
    # "average": every moment (and Adam's step count) becomes the Λ-weighted mean over branches.
    per_branch = [list(run.model.parameters()) for run in runs]
    for index in range(len(per_branch[0])):
        states = [
            run.optimizer.state.get(params[index], {})
            for run, params in zip(runs, per_branch, strict=True)
        ]
        if not all(states):
            continue
        averaged = {
            key: sum(w * state[key] for w, state in zip(weights, states, strict=True))
            for key in states[0]
        }
        for run, params in zip(runs, per_branch, strict=True):
            run.optimizer.state[params[index]] = {k: v.clone() for k, v in averaged.items()}


def _snapshot(
    config: ForkMergeConfig,
    runs: Sequence[BranchRun],
    ranking: Ranking,
    progress: _Progress,
    merged: Mapping[str, torch.Tensor],
) -> dict[str, Any]:
    """Everything needed to continue the run after this merge exactly as if uninterrupted."""
    return {
        "format": CHECKPOINT_FORMAT,
        "config": config.as_params(),
        "round": progress.round,
        "step": progress.step,
        "merged": {k: v.detach().cpu().clone() for k, v in merged.items()},
        "branches": [
            {
                "name": run.branch.name,
                "weights": dict(run.branch.weights),
                "optimizer": copy.deepcopy(run.optimizer.state_dict()),
                "generator": run.generator.get_state(),
            }
            for run in runs
        ],
        "ranking": asdict(ranking),
        "decisions": [decision.to_dict() for decision in progress.decisions],
        "steps": list(progress.steps),
        "best": None
        if progress.best_state is None
        else {
            "state": progress.best_state,
            "score": progress.best_score,
            "round": progress.best_round,
        },
        "torch_rng": torch.get_rng_state(),
    }


CHECKPOINT_FORMAT = 1


@dataclass
class _Progress:
    """Where the loop is; restored from a checkpoint on resume."""

    round: int = 0
    step: int = 0
    decisions: list[MergeDecision] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    best_state: dict[str, torch.Tensor] | None = None
    best_score: float = -math.inf
    best_round: int = 0

    @property
    def warm_start(self) -> tuple[float, ...] | None:
        return self.decisions[-1].weights if self.decisions else None


def _check_resumable(config: ForkMergeConfig, checkpoint: Mapping[str, Any]) -> None:
    if checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise invalid(
            "resume", checkpoint.get("format"), f"a checkpoint of format {CHECKPOINT_FORMAT}"
        )
    saved = dict(checkpoint["config"])
    current = config.as_params()
    different = sorted(k for k in current if k != "log_every" and saved.get(k) != current[k])
    if different:
        raise invalid(
            "resume",
            ", ".join(f"{k}={saved.get(k)!r}" for k in different),
            "a checkpoint written with the same configuration (it differs in "
            + ", ".join(different)
            + ")",
        )


def run_forkmerge(
    problem: Problem,
    config: ForkMergeConfig,
    events: EventStream | None = None,
    *,
    name: str = "forkmerge",
    resume_from: Mapping[str, Any] | None = None,
) -> ForkMergeResult:
    """Train with ForkMerge and return the final model with every merge decision.

    ``resume_from`` is a snapshot taken at a merge (see :class:`~fm_optuna.events.MergeCompleted`);
    the run continues after that merge and, with the same seed, reproduces the Λ trajectory of
    an uninterrupted run.
    """
    events = events or EventStream()
    started = time.perf_counter()
    problem = for_plan(problem, config.plan)
    strategy = make_strategy(config.strategy, resolution=config.grid_resolution)
    shared = seeded_model(problem, config.seed)
    progress = _Progress()
    if resume_from is None:
        initial = copy.deepcopy(shared.state_dict())
        branches, ranking = plan_branches(problem, config, initial)
    else:
        _check_resumable(config, resume_from)
        ranking = Ranking(
            **{**resume_from["ranking"], "order": tuple(resume_from["ranking"]["order"])}
        )
        branches = [Branch(b["name"], dict(b["weights"])) for b in resume_from["branches"]]
        shared.load_state_dict(resume_from["merged"])
        progress.round, progress.step = resume_from["round"], resume_from["step"]
        progress.decisions = [MergeDecision.from_dict(d) for d in resume_from["decisions"]]
        progress.steps = list(resume_from["steps"])
        if resume_from["best"] is not None:
            progress.best_state = resume_from["best"]["state"]
            progress.best_score = resume_from["best"]["score"]
            progress.best_round = resume_from["best"]["round"]
        torch.set_rng_state(resume_from["torch_rng"])
    timings = {
        "ranking": ranking.seconds,
        "train": 0.0,
        "evaluate": 0.0,
        "search": 0.0,
        "merge": 0.0,
    }

    runs = []
    for index, branch in enumerate(branches):
        model = copy.deepcopy(shared)
        run = BranchRun(
            branch,
            model,
            make_optimizer(model, config.lr),
            data_generator(problem, config.seed, index),
        )
        if resume_from is not None:
            saved = resume_from["branches"][index]
            run.optimizer.load_state_dict(saved["optimizer"])
            run.generator.set_state(saved["generator"])
        runs.append(run)
    names = tuple(branch.name for branch in branches)
    events.emit(
        RunStarted(
            run=name,
            params={
                **config.as_params(),
                **problem.describe(),
                "ranking_method": ranking.method,
                "ranking_order": ",".join(ranking.order),
                "n_branches": len(branches),
            },
            branches={branch.name: dict(branch.weights) for branch in branches},
            total_steps=config.total_steps,
            resumed_at_step=progress.step,
        )
    )

    while progress.round < config.rounds:
        round_index = progress.round + 1
        length = min(config.dt, config.total_steps - progress.step)
        tic = time.perf_counter()
        for run in runs:

            def report(at: int, losses: dict[str, float], branch: str = run.branch.name) -> None:
                events.emit(TrainingProgress(run=name, branch=branch, step=at, losses=losses))

            train(
                run.model,
                run.optimizer,
                problem,
                WeightedSum(run.branch.weights),
                steps=length,
                generator=run.generator,
                start_step=progress.step,
                log_every=config.log_every,
                on_losses=report,
            )
        step = progress.step + length
        timings["train"] += time.perf_counter() - tic

        tic = time.perf_counter()
        evaluated = [target_score(problem, run.model) for run in runs]
        branch_scores = [score for score, _ in evaluated]
        timings["evaluate"] += time.perf_counter() - tic
        events.emit(
            BranchesEvaluated(
                run=name,
                round=round_index,
                step=step,
                scores=dict(zip(names, branch_scores, strict=True)),
                metrics={n: m for n, (_, m) in zip(names, evaluated, strict=True)},
            )
        )

        tic = time.perf_counter()
        stack = BranchStack([run.model.state_dict() for run in runs])
        candidate = runs[0].model  # scratch model for candidates; every branch is re-forked below

        def evaluate(
            weights: np.ndarray, stack: BranchStack = stack, candidate: nn.Module = candidate
        ) -> float:
            candidate.load_state_dict(stack.combine(weights))
            return target_score(problem, candidate)[0]

        decision = search_merge(
            evaluate,
            strategy=strategy,
            n_branches=len(runs),
            budget=config.merge_trials,
            seed=config.seed * 7919 + round_index,
            branch_scores=branch_scores,
            warm_start=progress.warm_start,
        )
        timings["search"] += time.perf_counter() - tic

        tic = time.perf_counter()
        merged = stack.combine(decision.weights)
        for run in runs:  # fork: every branch restarts from θ*
            run.model.load_state_dict(merged)
        apply_optimizer_policy(runs, decision.weights, config.optimizer_policy, config.lr)
        timings["merge"] += time.perf_counter() - tic

        merged_score, merged_metrics = target_score(problem, runs[0].model)
        if config.final == "best" and merged_score > progress.best_score:
            progress.best_state = {k: v.clone() for k, v in merged.items()}
            progress.best_score, progress.best_round = merged_score, round_index
        progress.decisions.append(decision)
        progress.steps.append(step)
        progress.round, progress.step = round_index, step
        snapshot = functools.partial(_snapshot, config, runs, ranking, progress, merged)
        events.emit(
            MergeCompleted(
                run=name,
                round=round_index,
                step=step,
                branches=names,
                decision=decision,
                merged_metrics=merged_metrics,
                best_branch_score=max(
                    (s for s in branch_scores if math.isfinite(s)), default=-math.inf
                ),
                snapshot=snapshot,
            )
        )

    final = copy.deepcopy(runs[0].model)
    final_round = config.rounds
    if progress.best_state is not None:
        final.load_state_dict(progress.best_state)
        final_round = progress.best_round
    return ForkMergeResult(
        final,
        branches,
        progress.decisions,
        progress.steps,
        ranking,
        final_round,
        time.perf_counter() - started,
        timings,
    )
