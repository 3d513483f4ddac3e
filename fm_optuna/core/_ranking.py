"""Ranking the auxiliaries by relevance to the target, for Alg. 4's pruned branches.

Three rankings sit here, above the measurements they use and below the ForkMerge loop:

- ``prepass`` (the official code): one short target+aux run per auxiliary from the initial model,
  ranked by the target's validation score;
- ``affinity``: the lookahead inter-task affinity Z_{aux→target} of Fifty et al. over one short
  joint run (:func:`fm_optuna.core.task_affinity`);
- ``merge`` (the paper's Alg. 4): Λ̄_k, the weight that an Alg. 2 merge of the pairwise
  branches (target only, target + each auxiliary, each trained from the initial model) gives
  target + aux k;
- ``given``: an explicit order (``aux_order``), else the problem's task order.

:func:`plan_ranking` measures the ranking a plan needs, :func:`plan_branches` turns it into the
plan's branches; :func:`ranking_agreement`
compares two orders.

With ``replicas`` (the problem on further devices, see :mod:`fm_optuna.core._devices`) the short
runs of ``prepass`` and ``merge`` train as a round's branches do, run i on device i mod n, and
are scored on the first; ``affinity``'s one joint run stays on the first device.
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from fm_optuna.core._affinity import task_affinity
from fm_optuna.core._branch_training import (
    BranchRun,
    RoundSteps,
    branch_randomness,
    round_trainer,
)
from fm_optuna.core._branches import Branch, default_branch_count, make_plan, pairwise_plan
from fm_optuna.core._devices import BranchDevices
from fm_optuna.core._merging import BranchStack
from fm_optuna.core._training import (
    data_generator,
    make_optimization,
    seeded_model,
    target_score,
)
from fm_optuna.errors import invalid
from fm_optuna.search._search import search_merge
from fm_optuna.search.strategies import make_strategy

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from fm_optuna.config import ForkMergeConfig
    from fm_optuna.problem._tasks import Problem


@dataclass
class Ranking:
    """A best-first order of the auxiliaries, with the relevance that ordered them (if any)."""

    order: tuple[str, ...]
    relevance: tuple[float, ...] | None
    seconds: float
    method: str


def rank_auxiliaries(
    problem: Problem,
    config: ForkMergeConfig,
    initial: Mapping[str, torch.Tensor],
    *,
    replicas: Sequence[Problem] = (),
) -> Ranking:
    """Best-first order of the auxiliaries (with relevance scores when measured); the short
    runs train on ``problem`` and its ``replicas`` (see the module docstring)."""
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
        return rank_by_affinity(problem, config, initial)
    if config.ranking == "merge":
        return rank_by_merge_weights(problem, config, initial, replicas=replicas)
    scores: dict[str, float] = {}
    weightings = [{problem.target: 1.0, aux: 1.0} for aux in auxiliaries]
    devices = BranchDevices(problem, replicas)
    trained = _train_from(initial, devices, config, weightings, 10_000)
    for aux, model in zip(auxiliaries, trained, strict=True):
        score = -math.inf if model is None else target_score(problem, model)[0]
        # A diverged run ranks last; the branches report their own divergence.
        scores[aux] = score if math.isfinite(score) else -math.inf
    order = tuple(sorted(auxiliaries, key=lambda a: (-scores[a], auxiliaries.index(a))))
    return Ranking(order, tuple(scores[a] for a in order), time.perf_counter() - started, "prepass")


def _train_from(
    initial: Mapping[str, torch.Tensor],
    devices: BranchDevices,
    config: ForkMergeConfig,
    weightings: Sequence[Mapping[str, float]],
    first_stream: int,
) -> list[torch.nn.Module | None]:
    """The initial model trained ``ranking_steps`` (else Δt) on each weighting, as a round's
    branches are (at the same time with ``parallel_branches``, each with its own draws, run i
    on device i mod n); every trained model is returned on the first device.

    A run whose training turned non-finite is ``None`` (with a warning).
    """
    base = seeded_model(devices.first, config.seed)
    base.load_state_dict(initial)
    runs = [
        _ranking_run(base, devices.problem_of(index), config, weights, first_stream + index)
        for index, weights in enumerate(weightings)
    ]
    steps = RoundSteps(0, config.ranking_steps or config.dt, config.log_every)
    trainer = round_trainer(config.parallel_branches, devices.devices)
    errors = trainer(runs, steps, lambda index, step, losses: None)
    for run, error in zip(runs, errors, strict=True):
        if error is not None:
            located = error.located(run="ranking")
            logger.warning("fm-optuna: ranking run %s: %s", run.branch.name, located)
    return [
        run.model.to(devices.first.device) if error is None else None
        for run, error in zip(runs, errors, strict=True)
    ]


def _ranking_run(
    base: torch.nn.Module,
    problem: Problem,
    config: ForkMergeConfig,
    weights: Mapping[str, float],
    stream: int,
) -> BranchRun:
    """One short ranking run from ``base`` on ``problem``'s device, seeded by ``stream``."""
    model = copy.deepcopy(base).to(problem.device)
    return BranchRun(
        Branch("+".join(weights), dict(weights)),
        model,
        make_optimization(model, config),
        data_generator(problem, config.seed, stream),
        problem,
        randomness=branch_randomness(config.seed, stream, torch.device(problem.device)),
    )


def rank_by_merge_weights(
    problem: Problem,
    config: ForkMergeConfig,
    initial: Mapping[str, torch.Tensor],
    *,
    replicas: Sequence[Problem] = (),
) -> Ranking:
    """Best-first auxiliaries by Λ_k, the weight one Alg. 2 merge gives target + aux k.

    The K pairwise branches train ``ranking_steps`` (else Δt) from the initial model, and the
    merge search of ``config.strategy`` chooses Λ on the simplex as in a ForkMerge round; one
    round stands in for the paper's Λ̄_k averaged over a short Alg. 2 run. Costs K short runs
    (one more than the pre-pass) plus one merge search.
    """
    started = time.perf_counter()
    auxiliaries = problem.auxiliaries
    merged: list[str | None] = []  # the auxiliary of each merged branch (None: target only)
    states, scores = [], []
    weightings = [branch.weights for branch in pairwise_plan(problem.target, auxiliaries)]
    trained = _train_from(initial, BranchDevices(problem, replicas), config, weightings, 20_000)
    for index, model in enumerate(trained):
        if model is not None:
            merged.append(auxiliaries[index - 1] if index else None)
            states.append(copy.deepcopy(model.state_dict()))
            scores.append(target_score(problem, model)[0])
    if not states:  # every branch diverged: nothing to rank by
        return Ranking(tuple(auxiliaries), None, time.perf_counter() - started, "merge")
    stack = BranchStack(states)
    model = seeded_model(problem, config.seed)

    def evaluate(weights: Sequence[float]) -> float:
        model.load_state_dict(stack.combine(weights))
        return target_score(problem, model)[0]

    decision = search_merge(
        evaluate,
        strategy=make_strategy(config.strategy, resolution=config.grid_resolution),
        n_branches=len(states),
        budget=config.merge_trials,
        seed=config.seed * 7919,
        branch_scores=scores,
    )
    weight = dict.fromkeys(auxiliaries, -math.inf)  # a diverged pairwise branch ranks last
    chosen = zip(merged, decision.weights, strict=True)
    weight.update((aux, float(w)) for aux, w in chosen if aux is not None)
    order = tuple(sorted(auxiliaries, key=lambda a: (-weight[a], auxiliaries.index(a))))
    relevance = tuple(float(weight[a]) for a in order)
    return Ranking(order, relevance, time.perf_counter() - started, "merge")


def rank_by_affinity(
    problem: Problem, config: ForkMergeConfig, initial_state: Mapping[str, torch.Tensor]
) -> Ranking:
    """Best-first auxiliaries by Z_{aux→target} over a joint run of ``ranking_steps`` (else Δt).

    Only the target's column is measured, so each measured step costs K forwards and K backwards
    for the joint step plus K lookahead forwards of the target.
    """
    started = time.perf_counter()
    auxiliaries = problem.auxiliaries
    result = task_affinity(
        problem,
        config,
        initial_state,
        steps=config.ranking_steps or config.dt,
        # Adam's lookahead is simulated exactly; any other optimizer is looked ahead as SGD.
        lookahead="adam" if config.optimizer in ("adam", "adamw") else "sgd",
        onto=(problem.target,),
    )
    relevance = result.onto(problem.target)
    order = tuple(sorted(auxiliaries, key=lambda a: (-relevance[a], auxiliaries.index(a))))
    return Ranking(
        order,
        tuple(relevance[a] for a in order),
        time.perf_counter() - started,
        "affinity",
    )


def prepass_ranking(
    problem: Problem, config: ForkMergeConfig, initial_state: Mapping[str, torch.Tensor]
) -> Ranking:
    """The official pre-pass ranking, whatever ``config.ranking`` says."""
    return rank_auxiliaries(problem, replace(config, ranking="prepass"), initial_state)


def _needs_order(config: ForkMergeConfig, n_aux: int) -> bool:
    """Only a pruned plan with intermediate branches depends on the auxiliaries' order."""
    n_branches = len(config.keep) if config.keep else config.branches
    if config.plan == "pairwise" or n_aux < 2:
        return False
    if n_branches is None:
        n_branches = default_branch_count(n_aux + 1)
    return n_branches > 2


def plan_ranking(
    problem: Problem,
    config: ForkMergeConfig,
    initial: Mapping[str, torch.Tensor],
    *,
    replicas: Sequence[Problem] = (),
) -> Ranking:
    """The ranking ``config``'s plan needs, measured from ``initial`` (nothing measured when the
    plan's branches do not depend on the auxiliaries' order)."""
    if config.ranking in ("prepass", "affinity", "merge") and not _needs_order(
        config, len(problem.auxiliaries)
    ):
        return Ranking(tuple(problem.auxiliaries), None, 0.0, "not needed")
    return rank_auxiliaries(problem, config, initial, replicas=replicas)


def plan_branches(
    problem: Problem,
    config: ForkMergeConfig,
    initial: Mapping[str, torch.Tensor],
    *,
    ranking: Ranking | None = None,
    replicas: Sequence[Problem] = (),
) -> tuple[list[Branch], Ranking]:
    """The branches of ``config``'s plan and the ranking they were cut from (its short runs
    on ``problem`` and its ``replicas``).

    ``ranking`` is one already measured for this problem and configuration (``fm-optuna
    compare`` measures it once per seed for every strategy); its relevance reaches the cut rule
    as if measured here, which an order passed as ``ranking="given"`` would not.
    """
    if ranking is None:
        ranking = plan_ranking(problem, config, initial, replicas=replicas)
    else:
        _check_ranking(ranking, problem.auxiliaries)
    branches = make_plan(
        "pruned" if config.plan == "joint" else config.plan,
        target=problem.target,
        ranked_auxiliaries=ranking.order,
        n_branches=config.branches,
        relevance=ranking.relevance,
        cut=config.cut,
        keep=config.keep,
    )
    return branches, ranking


def _check_ranking(ranking: Ranking, auxiliaries: Sequence[str]) -> None:
    if sorted(ranking.order) != sorted(auxiliaries):
        raise invalid(
            "ranking", ",".join(ranking.order), "a permutation of " + ", ".join(auxiliaries)
        )
    if ranking.relevance is not None and len(ranking.relevance) != len(ranking.order):
        raise invalid(
            "ranking.relevance",
            len(ranking.relevance),
            f"{len(ranking.order)} scores (one per auxiliary)",
        )


@dataclass(frozen=True)
class Agreement:
    """How far two best-first orders of the same auxiliaries agree."""

    kendall_tau: float  # +1 same order, −1 reversed
    top_k_overlap: float  # |top-k(a) ∩ top-k(b)| / k
    k: int
    same_first: bool


def ranking_agreement(a: Sequence[str], b: Sequence[str], *, k: int | None = None) -> Agreement:
    """Kendall's τ between two orders of the same items, the top-k overlap and the top-1 match.

    ``k`` defaults to half the items, rounded up (the branches Alg. 4 keeps are top-k sets).

    Example:
        >>> ranking_agreement(["a", "b", "c"], ["a", "c", "b"]).kendall_tau
        0.3333333333333333
    """
    if sorted(a) != sorted(b):
        raise invalid("b", ",".join(b), "a permutation of " + ",".join(a))
    n = len(a)
    k = math.ceil(n / 2) if k is None else k
    if not 1 <= k <= max(n, 1):
        raise invalid("k", k, f"an integer from 1 to {n}")
    if n < 2:
        return Agreement(1.0, 1.0, k, True)
    position = {item: index for index, item in enumerate(b)}
    concordant = sum(
        1 if position[x] < position[y] else -1 for x, y in itertools.combinations(a, 2)
    )
    tau = concordant / (n * (n - 1) / 2)
    overlap = len(set(a[:k]) & set(b[:k])) / k
    return Agreement(tau, overlap, k, a[0] == b[0])
