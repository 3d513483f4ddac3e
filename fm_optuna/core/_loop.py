"""The fork → train → merge loop (Algorithms 1, 2 and 4), emitting events.

Every Δt optimizer steps the shared model θ* is forked into the plan's branches, each branch is
trained Δt steps on its task weights, and the branches are merged into θ* = Σ_b Λ_b θ_b with Λ
chosen by an inner Optuna study on the target's validation score. Δt and T count optimizer steps
of one branch.

A round reads as its phases (:class:`_ForkMergeLoop`): train the branches, evaluate them, search
Λ, merge and fork, record. Setting up (or resuming from a checkpoint) comes before the first.

Branches may train on several devices (``replicas``, see :mod:`fm_optuna.core._devices`):
branch i on device i mod n for the whole run, the merge, every evaluation of θ* and the
checkpoint on the first.

A branch whose training loss becomes NaN/inf sits out that round's merge (its Λ is 0; the
decision's ``fallback`` says why) and restarts from θ* with a fresh optimizer state; when every
branch does, the run raises :class:`~fm_optuna.errors.NonFiniteTraining`.

The run ends itself: its final model is evaluated on every task (``val`` and ``test``) and
``RunFinished`` carries that :class:`~fm_optuna.core.RunSummary` (or FAIL / PRUNED when the
run raised), so no caller builds a summary of its own.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from fm_optuna.config import (
    FINAL_MODELS,
    OPTIMIZER_POLICIES,
    RANKINGS,
    ForkMergeConfig,
    schema,
)
from fm_optuna.core._branch_training import (
    BranchRun,
    RoundSteps,
    RoundTrainer,
    branch_randomness,
    round_trainer,
)
from fm_optuna.core._branches import Branch
from fm_optuna.core._devices import BranchDevices, check_device_kind
from fm_optuna.core._ending import ends_if_raises, final_summary
from fm_optuna.core._events import (
    BranchDiverged,
    BranchesEvaluated,
    EventStream,
    MergeCompleted,
    RunFinished,
    RunStarted,
    RunSummary,
    TrainingProgress,
)
from fm_optuna.core._merging import BranchStack
from fm_optuna.core._ranking import Ranking, plan_branches
from fm_optuna.core._training import (
    data_generator,
    make_optimization,
    seeded_model,
    target_score,
)
from fm_optuna.errors import NonFiniteTraining, invalid
from fm_optuna.problem._tasks import Problem, describe_problem, for_plan
from fm_optuna.search._base import MergeDecision, MergeStrategy
from fm_optuna.search._merge_problem import MergeProblem, check_strategy_supported
from fm_optuna.search.strategies import make_strategy

logger = logging.getLogger(__name__)

__all__ = [
    "FINAL_MODELS",
    "OPTIMIZER_POLICIES",
    "RANKINGS",
    "BranchRun",
    "ForkMergeConfig",
    "ForkMergeResult",
    "apply_optimizer_policy",
    "check_resumable",
    "run_forkmerge",
]


@dataclass
class ForkMergeResult:
    model: nn.Module
    branches: list[Branch]
    decisions: list[MergeDecision]
    steps: list[int]
    ranking: Ranking
    final_round: int
    seconds: float  # the whole run's: final evaluation and the time before a resume included
    summary: RunSummary  # what RunFinished carried: the final model on every task, val and test
    timings: dict[str, float] = field(default_factory=dict)
    resumed_from_round: int = 0  # > 0: continued from the checkpoint of this merge round
    resumed_at_step: int = 0
    seconds_before_resume: float = 0.0  # training time of the process(es) before the resume

    @property
    def lambda_history(self) -> list[tuple[float, ...]]:
        return [decision.weights for decision in self.decisions]


def apply_optimizer_policy(
    runs: Sequence[BranchRun], weights: Sequence[float], policy: str, config: ForkMergeConfig
) -> None:
    """The optimizer state of every branch after a merge with ``weights``: ``keep``, ``reset``
    (fresh optimizer, the schedule goes on) or ``average`` (Λ-weighted mean of each state
    tensor the optimizer keeps — Adam's moments, SGD's momentum buffer — over the branches that
    have it and a positive weight)."""
    if policy == "keep":
        return
    if policy == "reset":
        for run in runs:
            run.optimization.restart_from(make_optimization(run.model, config))
        return
    contributing = [(w, run) for w, run in zip(weights, runs, strict=True) if w > 0]
    per_branch = {id(run): list(run.model.parameters()) for run in runs}
    for index in range(len(per_branch[id(runs[0])])):
        states = [
            run.optimizer.state.get(per_branch[id(run)][index], {}) for _, run in contributing
        ]
        if not all(states):
            continue
        keys = [
            key
            for key, value in states[0].items()
            if torch.is_tensor(value)
            and value.is_floating_point()
            and all(torch.is_tensor(state.get(key)) for state in states)
        ]
        total = sum(w for w, _ in contributing)
        # Branches on several devices: averaged where the first contributor's state is, then
        # copied to each branch's device (on one device, `to` is the tensor itself).
        where = {key: states[0][key].device for key in keys}
        averaged = {
            key: sum(
                w * state[key].to(where[key])
                for (w, _), state in zip(contributing, states, strict=True)
            )
            / total
            for key in keys
        }
        for run in runs:
            parameter = per_branch[id(run)][index]
            state = run.optimizer.state[parameter]
            state.update(
                {key: value.to(parameter.device, copy=True) for key, value in averaged.items()}
            )


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
    seconds_before: float = 0.0  # spent by earlier processes (restored from a checkpoint)
    seconds: float = 0.0  # spent up to the latest merge, earlier processes included

    @property
    def warm_start(self) -> tuple[float, ...] | None:
        return self.decisions[-1].weights if self.decisions else None


def _restrict(weights: Sequence[float] | None, healthy: Sequence[int]) -> tuple[float, ...] | None:
    """The previous Λ on the healthy branches only, renormalised (``None`` if nothing is left)."""
    if weights is None:
        return None
    kept = [weights[index] for index in healthy]
    total = sum(kept)
    return tuple(w / total for w in kept) if total > 0 else None


def _snapshot(
    config: ForkMergeConfig,
    runs: Sequence[BranchRun],
    ranking: Ranking,
    progress: _Progress,
    merged: Mapping[str, torch.Tensor],
) -> dict[str, Any]:
    """Everything needed to continue the run after this merge exactly as if uninterrupted
    (on any list of devices of the same kind: see :mod:`fm_optuna.core._devices`)."""
    return {
        "format": CHECKPOINT_FORMAT,
        "config": config.as_params(),
        "devices": list(dict.fromkeys(str(run.problem.device) for run in runs)),
        "round": progress.round,
        "step": progress.step,
        "seconds": progress.seconds,
        "merged": {k: v.detach().cpu().clone() for k, v in merged.items()},
        "branches": [
            {
                "name": run.branch.name,
                "weights": dict(run.branch.weights),
                **copy.deepcopy(run.optimization.state_dict()),  # optimizer, scheduler, scaler
                "generator": run.generator.get_state(),
                "randomness": None if run.randomness is None else run.randomness.state_dict(),
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


def check_resumable(
    config: ForkMergeConfig,
    checkpoint: Mapping[str, Any],
    devices: Sequence[torch.device] | None = None,
) -> None:
    """Raise a one-line ConfigError unless ``checkpoint`` continues a run of ``config`` (on
    ``devices``, when given: any list of the kind of device it was written on)."""
    if devices is not None:
        check_device_kind(checkpoint, devices)
    if checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise invalid(
            "resume", checkpoint.get("format"), f"a checkpoint of format {CHECKPOINT_FORMAT}"
        )
    current = config.as_params()
    # Keys added after a checkpoint was written held their defaults then.
    saved = {**ForkMergeConfig().as_params(), **checkpoint["config"]}
    # Options that do not change what a run trains (log_every, parallel_branches) may differ.
    free = {entry.name for entry in schema(ForkMergeConfig) if not entry.option.fingerprint}
    different = sorted(k for k in current if k not in free and saved.get(k) != current[k])
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
    progress.seconds_before = progress.seconds = float(checkpoint.get("seconds", 0.0))
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
        devices: BranchDevices,
        config: ForkMergeConfig,
        events: EventStream,
        name: str,
        resume_from: Mapping[str, Any] | None,
        ranking: Ranking | None = None,
        trainer: RoundTrainer | None = None,
    ) -> None:
        self.devices, self.problem = devices, devices.first
        self.config, self.events, self.name = config, events, name
        self.started = time.perf_counter()
        self.strategy: MergeStrategy = make_strategy(
            config.strategy, resolution=config.grid_resolution
        )
        check_strategy_supported(self.problem, self.strategy)
        shared = seeded_model(self.problem, config.seed)
        if resume_from is None:
            branches = self._set_up(shared, ranking)
        else:
            branches = self._resume(shared, resume_from)
        self.runs = [self._fork(shared, index, branch) for index, branch in enumerate(branches)]
        if resume_from is not None:
            for run, saved in zip(self.runs, resume_from["branches"], strict=True):
                run.optimization.load_state_dict(saved)  # optimizer, scheduler, scaler
                run.generator.set_state(saved["generator"])
                if run.randomness is not None and saved.get("randomness") is not None:
                    # Checkpoints from before branches had their own draws start them afresh.
                    run.randomness.load_state_dict(saved["randomness"])
        self.names = tuple(branch.name for branch in branches)
        self.train_round = trainer or round_trainer(config.parallel_branches, devices.devices)
        self.resumed_from = (self.progress.round, self.progress.step)
        self.timings = {
            "ranking": self.ranking.seconds,
            **dict.fromkeys(("train", "evaluate", "search", "merge"), 0.0),
        }

    def _set_up(self, shared: nn.Module, ranking: Ranking | None) -> list[Branch]:
        """A fresh run: rank the auxiliaries from θ_0 (unless ranked already), plan the branches."""
        self.progress = _Progress()
        branches, self.ranking = plan_branches(
            self.problem,
            self.config,
            copy.deepcopy(shared.state_dict()),
            ranking=ranking,
            replicas=self.devices.replicas,
        )
        return branches

    def _resume(self, shared: nn.Module, checkpoint: Mapping[str, Any]) -> list[Branch]:
        """Continue after the checkpoint's merge: θ*, decisions, ranking and RNG as they were."""
        check_resumable(self.config, checkpoint, self.devices.devices)
        self.progress = _restore_progress(checkpoint)
        saved = checkpoint["ranking"]
        self.ranking = Ranking(**{**saved, "order": tuple(saved["order"])})
        shared.load_state_dict(checkpoint["merged"])
        torch.set_rng_state(checkpoint["torch_rng"])
        return [Branch(b["name"], dict(b["weights"])) for b in checkpoint["branches"]]

    def _fork(self, shared: nn.Module, index: int, branch: Branch) -> BranchRun:
        """Branch ``index`` on its device for the whole run: model, optimizer, data stream and
        draws seeded as on one device."""
        problem = self.devices.problem_of(index)
        model = copy.deepcopy(shared).to(problem.device)
        generator = data_generator(problem, self.config.seed, index)
        randomness = branch_randomness(self.config.seed, index, torch.device(problem.device))
        optimization = make_optimization(model, self.config)
        return BranchRun(branch, model, optimization, generator, problem, randomness=randomness)

    @property
    def finished(self) -> bool:
        return self.progress.round >= self.config.rounds

    def elapsed(self) -> float:
        """Seconds of the whole run so far, earlier processes (before a resume) included."""
        return self.progress.seconds_before + time.perf_counter() - self.started

    def announce(self) -> None:
        self.events.emit(
            RunStarted(
                run=self.name,
                params={
                    **self.config.as_params(),
                    **describe_problem(self.problem),
                    "ranking_method": self.ranking.method,
                    "ranking_order": ",".join(self.ranking.order),
                    "n_branches": len(self.runs),
                },
                branches={run.branch.name: dict(run.branch.weights) for run in self.runs},
                total_steps=self.config.total_steps,
                resumed_at_step=self.progress.step,
                resumed_merges=tuple(
                    zip(self.progress.steps, self.progress.decisions, strict=True)
                ),
            )
        )

    def run_round(self) -> None:
        """Train → evaluate → search → merge and fork → record: one Δt of ForkMerge."""
        round_index = self.progress.round + 1
        step = self.train_branches(round_index)
        branch_scores = self.evaluate_branches(round_index, step)
        healthy = [index for index, run in enumerate(self.runs) if run.diverged is None]
        stack = BranchStack(
            [self.devices.on_first(self.runs[index].model.state_dict()) for index in healthy]
        )
        merge = MergeProblem(
            problem=self.problem,
            stack=stack,
            names=tuple(self.names[index] for index in healthy),
            branch_scores=tuple(branch_scores[index] for index in healthy),
            round=round_index,
            step=step,
            seed=self.config.seed * 7919 + round_index,
            warm_start=(
                _restrict(self.progress.warm_start, healthy) if self.config.warm_start else None
            ),
            model=self._scratch_model(healthy),
        )
        decision = self.search(merge, healthy)
        merged = self.merge_and_fork(stack, healthy, decision)
        self.record(round_index, step, decision, merged, merge)

    def _scratch_model(self, healthy: Sequence[int]) -> nn.Module:
        """A model on the first device for the merge candidates: the first healthy branch
        there, else branch 0 (every branch is re-forked from θ* afterwards)."""
        on_first = [i for i in healthy if self.runs[i].problem is self.problem]
        return self.runs[on_first[0] if on_first else 0].model

    def train_branches(self, round_index: int) -> int:
        """Every branch trains the next Δt steps (fewer in a last, shorter round).

        A branch whose loss goes non-finite is reported (an event and a warning) and sits out
        the merge; if every branch does, the run stops with :class:`NonFiniteTraining`.
        """
        tic = time.perf_counter()
        start = self.progress.step
        length = min(self.config.dt, self.config.total_steps - start)

        def report(index: int, at: int, losses: dict[str, float]) -> None:
            branch = self.runs[index].branch.name
            self.events.emit(TrainingProgress(run=self.name, branch=branch, step=at, losses=losses))

        outcomes = self.train_round(
            self.runs, RoundSteps(start, length, self.config.log_every), report
        )
        for run, error in zip(self.runs, outcomes, strict=True):
            if error is not None:
                self._diverged(
                    run, error.located(run=self.name, branch=run.branch.name), round_index
                )
        self.timings["train"] += time.perf_counter() - tic
        if all(run.diverged is not None for run in self.runs):
            errors = [run.diverged for run in self.runs if run.diverged is not None]
            first = min(errors, key=lambda error: error.step)
            raise NonFiniteTraining(
                first.task,
                first.step,
                first.value,
                run=first.run,
                branch=first.branch,
                detail=f"every branch of round {round_index} went non-finite",
            )
        return start + length

    def _diverged(self, run: BranchRun, error: NonFiniteTraining, round_index: int) -> None:
        run.diverged = error
        logger.warning(
            "fm-optuna: training loss became %s (%s); the branch sits out this merge",
            error.value,
            error.where(),
        )
        self.events.emit(
            BranchDiverged(
                run=self.name,
                round=round_index,
                branch=run.branch.name,
                step=error.step,
                task=error.task,
                message=str(error),
            )
        )

    def evaluate_branches(self, round_index: int, step: int) -> list[float]:
        """Each branch's target validation score (NaN, unevaluated, for a diverged branch),
        on its own device's copy of the validation data (no copy of the model)."""
        tic = time.perf_counter()
        evaluated = [
            (math.nan, {}) if run.diverged is not None else target_score(run.problem, run.model)
            for run in self.runs
        ]
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

    def search(self, merge: MergeProblem, healthy: Sequence[int]) -> MergeDecision:
        """The inner study: Λ on the simplex maximising the target's validation score, over the
        branches whose training stayed finite (the others get Λ = 0)."""
        tic = time.perf_counter()
        if len(healthy) == 1:
            decision = MergeDecision((1.0,), merge.branch_scores[0], (), 0.0, self.strategy.name)
        else:
            decision = merge.search(
                self.strategy,
                self.config.merge_trials,
                evaluation=self.config.evaluation,
                chunks=self.config.evaluation_chunks,
                prune_sigmas=self.config.prune_sigmas,
            )
        self.timings["search"] += time.perf_counter() - tic
        return self._widen(decision, healthy)

    def _widen(self, decision: MergeDecision, healthy: Sequence[int]) -> MergeDecision:
        """A decision over the healthy branches as one over all branches (Λ = 0 elsewhere)."""
        if len(healthy) == len(self.runs):
            return decision

        def widen(weights: Sequence[float]) -> tuple[float, ...]:
            full = [0.0] * len(self.runs)
            for index, weight in zip(healthy, weights, strict=True):
                full[index] = float(weight)
            return tuple(full)

        left_out = [run.diverged for run in self.runs if run.diverged is not None]
        reason = "; ".join(
            f"branch {e.branch} went non-finite ({e.task} at step {e.step})" for e in left_out
        )
        reason += "; merged the other branches"
        return dataclasses.replace(
            decision,
            weights=widen(decision.weights),
            trials=tuple(
                dataclasses.replace(trial, weights=widen(trial.weights))
                for trial in decision.trials
            ),
            fallback=reason if decision.fallback is None else f"{reason}; {decision.fallback}",
        )

    def merge_and_fork(
        self, stack: BranchStack, healthy: Sequence[int], decision: MergeDecision
    ) -> dict[str, torch.Tensor]:
        """θ* = Σ Λ_b θ_b; every branch restarts from θ* under the optimizer-state policy (a
        diverged branch from a fresh optimizer state, its schedule where the others' is)."""
        tic = time.perf_counter()
        merged = stack.combine([decision.weights[index] for index in healthy])
        schedule = self.runs[healthy[0]].optimization.scheduler
        for run in self.runs:
            run.model.load_state_dict(merged)  # copied onto the branch's device
            if run.diverged is not None:
                run.optimization.restart_from(
                    make_optimization(run.model, self.config), schedule=schedule
                )
                run.diverged = None
        apply_optimizer_policy(
            self.runs, decision.weights, self.config.optimizer_policy, self.config
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
        progress.seconds = progress.seconds_before + time.perf_counter() - self.started
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
                    merge.to_data,
                    # The decision over the searched branches (a diverged one sat out).
                    decision=decision if len(decision.weights) == merge.n_branches else None,
                    config=self.config.as_params(),
                ),
            )
        )

    def result(self) -> ForkMergeResult:
        """The final model (the last merge, or the best with ``final="best"``) and its summary."""
        final = copy.deepcopy(self.runs[0].model)
        final_round = self.config.rounds
        if self.progress.best_state is not None:
            final.load_state_dict(self.progress.best_state)
            final_round = self.progress.best_round
        summary = final_summary(
            self.problem, final, run=self.name, step=self.progress.step, elapsed=self.elapsed
        )
        return ForkMergeResult(
            final,
            [run.branch for run in self.runs],
            self.progress.decisions,
            self.progress.steps,
            self.ranking,
            final_round,
            summary.seconds,
            summary,
            self.timings,
            resumed_from_round=self.resumed_from[0],
            resumed_at_step=self.resumed_from[1],
            seconds_before_resume=self.progress.seconds_before,
        )


def run_forkmerge(
    problem: Problem,
    config: ForkMergeConfig,
    events: EventStream | None = None,
    *,
    name: str = "forkmerge",
    resume_from: Mapping[str, Any] | None = None,
    ranking: Ranking | None = None,
    trainer: RoundTrainer | None = None,
    replicas: Sequence[Problem] = (),
) -> ForkMergeResult:
    """Train with ForkMerge and return the final model with every merge decision.

    ``replicas`` are the same problem built on further devices by the same factory (one device
    per branch, see :mod:`fm_optuna.core._devices`): branch i trains on
    ``(problem, *replicas)[i % n]``; the ranking's scores, the merge, θ*'s evaluation and the
    checkpoint stay on ``problem``'s device.

    ``trainer`` trains a round's branches (default: one after another, or all at once with
    ``config.parallel_branches``: in processes, in threads, or one thread per device; see
    :mod:`fm_optuna.core._branch_training`): the seam for another way.

    ``ranking`` is one already measured with :func:`~fm_optuna.core.plan_ranking` for this
    problem, configuration and seed: the run plans its branches from it (order and relevance)
    instead of ranking again. Its seconds appear in ``timings["ranking"]`` but not in
    ``seconds``, which count only this call.

    ``resume_from`` is a snapshot taken at a merge (see :class:`~fm_optuna.core.MergeCompleted`);
    the run continues after that merge and, with the same seed, reproduces the Λ trajectory of
    an uninterrupted run; its result's ``seconds`` include the time spent before the resume.

    The run ends itself in ``events``: ``RunFinished`` with the final model's
    :class:`~fm_optuna.core.RunSummary` (``result.summary``), or FAIL (PRUNED for
    :class:`~fm_optuna.core.RunPruned`) when training, an observer or the final evaluation
    raises; the error is re-raised.
    """
    if ranking is not None and resume_from is not None:
        raise invalid("ranking", ranking.method, "absent when resuming (the checkpoint holds one)")
    loop = _ForkMergeLoop(
        # Every copy as the plan trains it (the joint plan's pseudo-target around each).
        BranchDevices(
            for_plan(problem, config.plan), [for_plan(replica, config.plan) for replica in replicas]
        ),
        config,
        events or EventStream(),
        name,
        resume_from,
        ranking,
        trainer,
    )
    loop.announce()
    with ends_if_raises(loop.events, name, loop.elapsed):
        while not loop.finished:
            loop.run_round()
        result = loop.result()
    loop.events.emit(RunFinished(run=name, summary=result.summary))
    return result
