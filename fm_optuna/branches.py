"""Branch plans: which task-weighting vectors ω the forked branches train with.

- ``pairwise`` (Alg. 1 for K = 2, Alg. 2 otherwise): target only, plus target + task k for every
  auxiliary k — K branches.
- ``pruned`` (Alg. 4): rank auxiliaries by relevance, ν^k = target + top-(k−1) auxiliaries; keep
  L branches, always ν^1 (target only) and ν^K (all tasks). Default L = max(2, ⌈log2 K⌉).
- ``joint`` (App. A.4): one model for all tasks. A pseudo-target whose loss is the mean of all
  task losses and whose score is the sum of the task scores; the branches are those of
  ``pruned`` with every task as an auxiliary of the pseudo-target.

Unit weights are used throughout: the equivalences of Eq. 8, 13 and 14 hold for them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from fm_optuna.errors import invalid, one_of

PLANS = ("pruned", "pairwise", "joint")


@dataclass(frozen=True)
class Branch:
    name: str
    weights: Mapping[str, float]  # task -> weight; tasks absent have weight 0

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(task for task, weight in self.weights.items() if weight != 0.0)


def default_branch_count(n_tasks: int) -> int:
    return max(2, math.ceil(math.log2(n_tasks)))


def pairwise_plan(target: str, auxiliaries: Sequence[str]) -> list[Branch]:
    branches = [Branch("target", {target: 1.0})]
    branches += [Branch(f"target+{aux}", {target: 1.0, aux: 1.0}) for aux in auxiliaries]
    return branches


def _cut_points(n_aux: int, n_branches: int, relevance: Sequence[float] | None) -> list[int]:
    """How many top auxiliaries each intermediate branch adds (ν^k keeps k−1 of them).

    With relevance scores (sorted decreasingly), cut where consecutive scores drop most — the
    analogue of keeping the largest Λ̄_k = λ_k − λ_{k+1} in Alg. 4. Without scores, cut evenly.
    """
    inner = n_branches - 2
    if inner <= 0:
        return []
    candidates = list(range(1, n_aux))  # number of auxiliaries kept by an intermediate branch
    if relevance is not None:
        gaps = {k: relevance[k - 1] - relevance[k] for k in candidates}
        chosen = sorted(candidates, key=lambda k: (-gaps[k], k))[:inner]
    else:
        chosen = sorted({round(n_aux * (i + 1) / (inner + 1)) for i in range(inner)})
        chosen = [k for k in chosen if 1 <= k < n_aux]
        for k in candidates:  # rounding collisions: fill with the first unused cut points
            if len(chosen) >= inner:
                break
            if k not in chosen:
                chosen.append(k)
    return sorted(chosen)


def pruned_plan(
    target: str,
    ranked_auxiliaries: Sequence[str],
    n_branches: int,
    relevance: Sequence[float] | None = None,
) -> list[Branch]:
    """ν^1, the chosen intermediate ν^k and ν^K for auxiliaries already ranked best-first."""
    cuts = _cut_points(len(ranked_auxiliaries), n_branches, relevance)
    branches = [Branch("target", {target: 1.0})]
    for k in cuts:
        kept = ranked_auxiliaries[:k]
        branches.append(Branch(f"target+top{k}", {target: 1.0, **dict.fromkeys(kept, 1.0)}))
    branches.append(Branch("all", {target: 1.0, **dict.fromkeys(ranked_auxiliaries, 1.0)}))
    return branches


def make_plan(
    plan: str,
    *,
    target: str,
    ranked_auxiliaries: Sequence[str],
    n_branches: int | None,
    relevance: Sequence[float] | None = None,
) -> list[Branch]:
    """Build and validate a plan; ``ranked_auxiliaries`` is best-first (pruned plans use it)."""
    if plan not in PLANS:
        raise one_of("plan", plan, PLANS)
    n_tasks = len(ranked_auxiliaries) + 1
    if n_tasks < 2:
        raise invalid("tasks", n_tasks, "at least a target and one auxiliary task")
    limit = n_tasks
    if n_branches is None:
        n_branches = n_tasks if plan == "pairwise" else min(limit, default_branch_count(n_tasks))
    if not 2 <= n_branches <= limit:
        raise invalid(
            "branches",
            n_branches,
            f"an integer from 2 to {limit} for the {plan} plan with {n_tasks} tasks",
        )
    if plan == "pairwise":
        if n_branches != n_tasks:
            raise invalid("branches", n_branches, f"{n_tasks} (one per task) for the pairwise plan")
        return pairwise_plan(target, ranked_auxiliaries)
    return pruned_plan(target, ranked_auxiliaries, n_branches, relevance)
