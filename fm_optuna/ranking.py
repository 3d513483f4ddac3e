"""Ranking the auxiliaries by relevance to the target, for Alg. 4's pruned branches.

Three rankings sit here, above the measurements they use and below the ForkMerge loop:

- ``prepass`` (the official code): one short target+aux run per auxiliary from the initial model,
  ranked by the target's validation score;
- ``affinity``: the lookahead inter-task affinity Z_{aux→target} of Fifty et al. over one short
  joint run (:func:`fm_optuna.affinity.task_affinity`);
- ``given``: an explicit order (``aux_order``), else the problem's task order.

:func:`plan_branches` turns the ranking into the plan's branches; :func:`ranking_agreement`
compares two orders.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from fm_optuna.affinity import task_affinity
from fm_optuna.branches import Branch, default_branch_count, make_plan
from fm_optuna.errors import NonFiniteTraining, invalid
from fm_optuna.training import (
    WeightedSum,
    data_generator,
    make_optimization,
    seeded_model,
    target_score,
    train,
)

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    import torch

    from fm_optuna.config import ForkMergeConfig
    from fm_optuna.tasks import Problem


@dataclass
class Ranking:
    """A best-first order of the auxiliaries, with the relevance that ordered them (if any)."""

    order: tuple[str, ...]
    relevance: tuple[float, ...] | None
    seconds: float
    method: str


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
        return rank_by_affinity(problem, config, initial)
    steps = config.ranking_steps or config.dt
    scores: dict[str, float] = {}
    model = seeded_model(problem, config.seed)
    for index, aux in enumerate(auxiliaries):
        model.load_state_dict(initial)
        optimization = make_optimization(model, config)
        rule = WeightedSum({problem.target: 1.0, aux: 1.0})
        generator = data_generator(problem, config.seed, 10_000 + index)
        try:
            train(model, optimization, problem, rule, steps=steps, generator=generator)
        except NonFiniteTraining as error:  # ranked last; the branches report their own
            logger.warning("fm-optuna: pre-pass with %s: %s", aux, error.located(run="prepass"))
            scores[aux] = -math.inf
            continue
        score, _ = target_score(problem, model)
        scores[aux] = score if math.isfinite(score) else -math.inf
    order = tuple(sorted(auxiliaries, key=lambda a: (-scores[a], auxiliaries.index(a))))
    return Ranking(order, tuple(scores[a] for a in order), time.perf_counter() - started, "prepass")


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
