"""The fork → train → merge loop (Algorithms 1, 2 and 4), emitting events.

Every Δt optimizer steps the shared model θ* is forked into the plan's branches, each branch is
trained Δt steps on its task weights, and the branches are merged into θ* = Σ_b Λ_b θ_b with Λ
chosen by an inner Optuna study on the target's validation score. Δt and T count optimizer steps
of one branch.

A round reads as its phases (:class:`_ForkMergeLoop`): train the branches, evaluate them, search
Λ, merge and fork, record. Setting up (or resuming from a checkpoint) comes before the first.
"""

from __future__ import annotations

import copy
import functools
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from fm_optuna.branches import Branch
from fm_optuna.config import FINAL_MODELS, OPTIMIZER_POLICIES, RANKINGS, ForkMergeConfig
from fm_optuna.errors import invalid
from fm_optuna.events import (
    BranchesEvaluated,
    EventStream,
    MergeCompleted,
    RunStarted,
    TrainingProgress,
)
from fm_optuna.merge_problem import MergeProblem, check_strategy_supported
from fm_optuna.merging import BranchStack
from fm_optuna.ranking import Ranking, plan_branches
from fm_optuna.search import MergeDecision, MergeStrategy
from fm_optuna.strategies import make_strategy
from fm_optuna.tasks import Problem, for_plan
from fm_optuna.training import (
    WeightedSum,
    data_generator,
    make_optimizer,
    seeded_model,
    target_score,
    train,
)

__all__ = [
    "FINAL_MODELS",
    "OPTIMIZER_POLICIES",
    "RANKINGS",
    "BranchRun",
    "ForkMergeConfig",
    "ForkMergeResult",
    "apply_optimizer_policy",
    "run_forkmerge",
]


@dataclass
class BranchRun:
    """A live branch: its weighting, model, optimizer and data stream."""

    branch: Branch
    model: nn.Module
    optimizer: torch.optim.Optimizer
    generator: torch.Generator


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


def _restore_progress(checkpoint: Mapping[str, Any]) -> _Progress:
    progress = _Progress(round=checkpoint["round"], step=checkpoint["step"])
    progress.decisions = [MergeDecision.from_dict(d) for d in checkpoint["decisions"]]
    progress.steps = list(checkpoint["steps"])
    if checkpoint["best"] is not None:
        progress.best_state = checkpoint["best"]["state"]
        progress.best_score = checkpoint["best"]["score"]
        progress.best_round = checkpoint["best"]["round"]
    return progress


class _ForkMergeLoop:
    """One ForkMerge run's live state, advanced one round at a time by named phases."""

    def __init__(
        self,
        problem: Problem,
        config: ForkMergeConfig,
        events: EventStream,
        name: str,
        resume_from: Mapping[str, Any] | None,
    ) -> None:
        self.problem, self.config, self.events, self.name = problem, config, events, name
        self.strategy: MergeStrategy = make_strategy(
            config.strategy, resolution=config.grid_resolution
        )
        check_strategy_supported(problem, self.strategy)
        shared = seeded_model(problem, config.seed)
        if resume_from is None:
            branches = self._set_up(shared)
        else:
            branches = self._resume(shared, resume_from)
        self.runs = [self._fork(shared, index, branch) for index, branch in enumerate(branches)]
        if resume_from is not None:
            for run, saved in zip(self.runs, resume_from["branches"], strict=True):
                run.optimizer.load_state_dict(saved["optimizer"])
                run.generator.set_state(saved["generator"])
        self.names = tuple(branch.name for branch in branches)
        self.timings = {
            "ranking": self.ranking.seconds,
            **dict.fromkeys(("train", "evaluate", "search", "merge"), 0.0),
        }

    def _set_up(self, shared: nn.Module) -> list[Branch]:
        """A fresh run: rank the auxiliaries from θ_0 and plan the branches."""
        self.progress = _Progress()
        branches, self.ranking = plan_branches(
            self.problem, self.config, copy.deepcopy(shared.state_dict())
        )
        return branches

    def _resume(self, shared: nn.Module, checkpoint: Mapping[str, Any]) -> list[Branch]:
        """Continue after the checkpoint's merge: θ*, decisions, ranking and RNG as they were."""
        _check_resumable(self.config, checkpoint)
        self.progress = _restore_progress(checkpoint)
        saved = checkpoint["ranking"]
        self.ranking = Ranking(**{**saved, "order": tuple(saved["order"])})
        shared.load_state_dict(checkpoint["merged"])
        torch.set_rng_state(checkpoint["torch_rng"])
        return [Branch(b["name"], dict(b["weights"])) for b in checkpoint["branches"]]

    def _fork(self, shared: nn.Module, index: int, branch: Branch) -> BranchRun:
        model = copy.deepcopy(shared)
        generator = data_generator(self.problem, self.config.seed, index)
        return BranchRun(branch, model, make_optimizer(model, self.config.lr), generator)

    @property
    def finished(self) -> bool:
        return self.progress.round >= self.config.rounds

    def announce(self) -> None:
        self.events.emit(
            RunStarted(
                run=self.name,
                params={
                    **self.config.as_params(),
                    **self.problem.describe(),
                    "ranking_method": self.ranking.method,
                    "ranking_order": ",".join(self.ranking.order),
                    "n_branches": len(self.runs),
                },
                branches={run.branch.name: dict(run.branch.weights) for run in self.runs},
                total_steps=self.config.total_steps,
                resumed_at_step=self.progress.step,
            )
        )

    def run_round(self) -> None:
        """Train → evaluate → search → merge and fork → record: one Δt of ForkMerge."""
        round_index = self.progress.round + 1
        step = self.train_branches()
        branch_scores = self.evaluate_branches(round_index, step)
        stack = BranchStack([run.model.state_dict() for run in self.runs])
        merge = MergeProblem(
            problem=self.problem,
            stack=stack,
            names=self.names,
            branch_scores=tuple(branch_scores),
            round=round_index,
            step=step,
            seed=self.config.seed * 7919 + round_index,
            warm_start=self.progress.warm_start,
            # A scratch model for the candidates; every branch is re-forked from θ* afterwards.
            model=self.runs[0].model,
        )
        decision = self.search(merge)
        merged = self.merge_and_fork(stack, decision)
        self.record(round_index, step, decision, merged, merge)

    def train_branches(self) -> int:
        """Every branch trains the next Δt steps (fewer in a last, shorter round)."""
        tic = time.perf_counter()
        start = self.progress.step
        length = min(self.config.dt, self.config.total_steps - start)
        for run in self.runs:

            def report(at: int, losses: dict[str, float], branch: str = run.branch.name) -> None:
                self.events.emit(
                    TrainingProgress(run=self.name, branch=branch, step=at, losses=losses)
                )

            train(
                run.model,
                run.optimizer,
                self.problem,
                WeightedSum(run.branch.weights),
                steps=length,
                generator=run.generator,
                start_step=start,
                log_every=self.config.log_every,
                on_losses=report,
            )
        self.timings["train"] += time.perf_counter() - tic
        return start + length

    def evaluate_branches(self, round_index: int, step: int) -> list[float]:
        tic = time.perf_counter()
        evaluated = [target_score(self.problem, run.model) for run in self.runs]
        self.timings["evaluate"] += time.perf_counter() - tic
        scores = [score for score, _ in evaluated]
        self.events.emit(
            BranchesEvaluated(
                run=self.name,
                round=round_index,
                step=step,
                scores=dict(zip(self.names, scores, strict=True)),
                metrics={n: m for n, (_, m) in zip(self.names, evaluated, strict=True)},
            )
        )
        return scores

    def search(self, merge: MergeProblem) -> MergeDecision:
        """The inner study: Λ on the simplex maximising the target's validation score."""
        tic = time.perf_counter()
        decision = merge.search(
            self.strategy,
            self.config.merge_trials,
            chunks=self.config.evaluation_chunks if self.config.pruned_evaluation else 1,
        )
        self.timings["search"] += time.perf_counter() - tic
        return decision

    def merge_and_fork(
        self, stack: BranchStack, decision: MergeDecision
    ) -> dict[str, torch.Tensor]:
        """θ* = Σ Λ_b θ_b; every branch restarts from θ* under the optimizer-state policy."""
        tic = time.perf_counter()
        merged = stack.combine(decision.weights)
        for run in self.runs:
            run.model.load_state_dict(merged)
        apply_optimizer_policy(
            self.runs, decision.weights, self.config.optimizer_policy, self.config.lr
        )
        self.timings["merge"] += time.perf_counter() - tic
        return merged

    def record(
        self,
        round_index: int,
        step: int,
        decision: MergeDecision,
        merged: dict[str, torch.Tensor],
        merge: MergeProblem,
    ) -> None:
        """Keep the decision (and the best merge for ``final="best"``); tell the observers."""
        progress = self.progress
        merged_score, merged_metrics = target_score(self.problem, self.runs[0].model)
        if self.config.final == "best" and merged_score > progress.best_score:
            progress.best_state = {k: v.clone() for k, v in merged.items()}
            progress.best_score, progress.best_round = merged_score, round_index
        progress.decisions.append(decision)
        progress.steps.append(step)
        progress.round, progress.step = round_index, step
        finite_scores = (s for s in merge.branch_scores if math.isfinite(s))
        self.events.emit(
            MergeCompleted(
                run=self.name,
                round=round_index,
                step=step,
                branches=self.names,
                decision=decision,
                merged_metrics=merged_metrics,
                best_branch_score=max(finite_scores, default=-math.inf),
                snapshot=functools.partial(
                    _snapshot, self.config, self.runs, self.ranking, progress, merged
                ),
                merge_problem=functools.partial(
                    merge.to_data, decision=decision, config=self.config.as_params()
                ),
            )
        )

    def result(self, seconds: float) -> ForkMergeResult:
        final = copy.deepcopy(self.runs[0].model)
        final_round = self.config.rounds
        if self.progress.best_state is not None:
            final.load_state_dict(self.progress.best_state)
            final_round = self.progress.best_round
        return ForkMergeResult(
            final,
            [run.branch for run in self.runs],
            self.progress.decisions,
            self.progress.steps,
            self.ranking,
            final_round,
            seconds,
            self.timings,
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
    started = time.perf_counter()
    loop = _ForkMergeLoop(
        for_plan(problem, config.plan), config, events or EventStream(), name, resume_from
    )
    loop.announce()
    while not loop.finished:
        loop.run_round()
    return loop.result(time.perf_counter() - started)
