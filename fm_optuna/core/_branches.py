"""Branch plans: which task-weighting vectors ω the forked branches train with.

- ``pairwise`` (Alg. 1 for K = 2, Alg. 2 otherwise): target only, plus target + task k for every
  auxiliary k — K branches.
- ``pruned`` (Alg. 4): rank the n = K − 1 auxiliaries by relevance, ν^k = target + top-(k−1)
  auxiliaries; keep L branches, always ν^1 (target only) and ν^K (all tasks). Default
  L = max(2, ⌈log2 K⌉).
- ``joint`` (App. A.4): one model for all tasks. A pseudo-target whose loss is the mean of all
  task losses and whose score is the sum of the task scores; the branches are those of
  ``pruned`` with every task as an auxiliary of the pseudo-target.

Which intermediate ν^k a pruned plan keeps (a *cut* c is the number of top auxiliaries a branch
adds, 0 < c < n; ``keep`` lists them with the ends, 0 = target only and n = all):

- ``keep = [0, 1, 3]``: exactly these, as the official code's hand-made top-k lists; L = len(keep).
- ``cut = "spread"``: the L − 2 cuts evenly over the ranking, c_i = round(i · n / (L − 1)), so
  consecutive kept branches differ by ⌊n / (L − 1)⌋ or ⌈n / (L − 1)⌉ auxiliaries.
- ``cut = "gaps"``: where consecutive relevance scores drop most (the analogue of keeping the
  largest Λ̄_k = λ_k − λ_{k+1} in Alg. 4), however small the drops; the rule before ``auto``.
- ``cut = "auto"`` (default): a drop is cut at only when it *stands out* of the noise: with m
  drops, larger than max(8, 4√m) × their median. The factor is the 95 % quantile of
  largest drop / median drop for Gaussian-noise scores (simulated for 4 to 41 auxiliaries), so a
  ranking of pure noise has a drop that stands out in at most about 5 % of draws. The largest
  such drops (at most L − 2) are cut at, and the remaining cuts are spread evenly over the
  segments between them (the segment whose spacing after the cut stays widest first). Without a
  standing-out drop, or without scores, ``auto`` is ``spread``.

Unit weights are used throughout: the equivalences of Eq. 8, 13 and 14 hold for them.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from fm_optuna.errors import invalid, one_of

PLANS = ("pruned", "pairwise", "joint")
CUT_RULES = ("auto", "spread", "gaps")


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


def relevance_drops(relevance: Sequence[float]) -> dict[int, float]:
    """Cut c → relevance[c − 1] − relevance[c] for best-first scores (−inf scores: an inf drop)."""
    drops = {}
    for cut in range(1, len(relevance)):
        drop = relevance[cut - 1] - relevance[cut]
        drops[cut] = 0.0 if math.isnan(drop) else drop  # two −inf scores: no drop between them
    return drops


def standout_factor(n_drops: int) -> float:
    """How many median drops a drop must exceed to stand out (see the module docstring)."""
    return max(8.0, 4.0 * math.sqrt(n_drops))


def standout_cuts(relevance: Sequence[float], limit: int) -> list[int]:
    """The cuts (at most ``limit``, largest drop first) whose drop stands out of the noise."""
    drops = relevance_drops(relevance)
    if not drops or limit <= 0:
        return []
    threshold = standout_factor(len(drops)) * statistics.median(drops.values())
    standing = [cut for cut, drop in drops.items() if drop > threshold and drop > 0]
    return sorted(standing, key=lambda cut: (-drops[cut], cut))[:limit]


def largest_drop_cuts(relevance: Sequence[float], count: int) -> list[int]:
    drops = relevance_drops(relevance)
    return sorted(drops, key=lambda cut: (-drops[cut], cut))[:count]


def spread_cuts(n_aux: int, count: int, fixed: Sequence[int] = ()) -> list[int]:
    """``count`` cuts besides ``fixed``, spread evenly over the segments that ``fixed`` leaves.

    Each cut goes to the segment whose spacing after it stays widest; a segment of length s with
    j cuts gets them at round(i · s / (j + 1)) from its start.

    Example:
        >>> spread_cuts(10, 2), spread_cuts(10, 1, fixed=[2])
        ([3, 7], [6])
    """
    bounds = [0, *sorted(fixed), n_aux]
    lengths = [high - low for low, high in itertools.pairwise(bounds)]
    counts = [0] * len(lengths)
    for _ in range(count):
        room = [i for i, length in enumerate(lengths) if counts[i] + 1 < length]
        widest = max(room, key=lambda i: (lengths[i] / (counts[i] + 2), -i))
        counts[widest] += 1
    return [
        low + math.floor(length * i / (j + 1) + 0.5)
        for low, length, j in zip(bounds, lengths, counts, strict=False)
        for i in range(1, j + 1)
    ]


def _cut_points(
    n_aux: int, n_branches: int, relevance: Sequence[float] | None, cut: str = "auto"
) -> list[int]:
    """How many top auxiliaries each intermediate branch adds, by the rule ``cut``."""
    inner = n_branches - 2
    if inner <= 0:
        return []
    if relevance is None or cut == "spread":
        return spread_cuts(n_aux, inner)
    if cut == "gaps":
        return sorted(largest_drop_cuts(relevance, inner))
    fixed = standout_cuts(relevance, inner)
    return sorted(fixed + spread_cuts(n_aux, inner - len(fixed), fixed))


def pruned_plan(
    target: str,
    ranked_auxiliaries: Sequence[str],
    n_branches: int,
    relevance: Sequence[float] | None = None,
    *,
    cut: str = "auto",
    keep: Sequence[int] | None = None,
) -> list[Branch]:
    """ν^1, the chosen intermediate ν^k and ν^K for auxiliaries already ranked best-first."""
    if keep is not None:
        cuts = list(keep[1:-1])
    else:
        cuts = _cut_points(len(ranked_auxiliaries), n_branches, relevance, cut)
    branches = [Branch("target", {target: 1.0})]
    for k in cuts:
        kept = ranked_auxiliaries[:k]
        branches.append(Branch(f"target+top{k}", {target: 1.0, **dict.fromkeys(kept, 1.0)}))
    branches.append(Branch("all", {target: 1.0, **dict.fromkeys(ranked_auxiliaries, 1.0)}))
    return branches


def check_keep(keep: Sequence[int], n_aux: int | None = None, *, name: str = "keep") -> None:
    """``keep`` lists increasing top-k counts from 0 (target only) to ``n_aux`` (all tasks)."""
    text = ",".join(str(k) for k in keep)
    whole = all(isinstance(k, int) and not isinstance(k, bool) for k in keep)
    if (
        not whole
        or len(keep) < 2
        or keep[0] != 0
        or any(a >= b for a, b in itertools.pairwise(keep))
    ):
        raise invalid(
            name, text, "increasing integers from 0 (target only) to n (all tasks), e.g. 0,1,3"
        )
    if n_aux is not None and keep[-1] != n_aux:
        raise invalid(
            name, text, f"increasing integers from 0 to {n_aux} (all {n_aux} auxiliaries)"
        )


def make_plan(
    plan: str,
    *,
    target: str,
    ranked_auxiliaries: Sequence[str],
    n_branches: int | None,
    relevance: Sequence[float] | None = None,
    cut: str = "auto",
    keep: Sequence[int] | None = None,
) -> list[Branch]:
    """Build and validate a plan; ``ranked_auxiliaries`` is best-first (pruned plans use it)."""
    if plan not in PLANS:
        raise one_of("plan", plan, PLANS)
    if cut not in CUT_RULES:
        raise one_of("cut", cut, CUT_RULES)
    n_tasks = len(ranked_auxiliaries) + 1
    if n_tasks < 2:
        raise invalid("tasks", n_tasks, "at least a target and one auxiliary task")
    if keep is not None:
        if plan == "pairwise":
            raise invalid(
                "keep", ",".join(map(str, keep)), "used only with the pruned or joint plan"
            )
        check_keep(keep, len(ranked_auxiliaries))
        if n_branches is None:
            n_branches = len(keep)
    limit = n_tasks
    if n_branches is None:
        n_branches = n_tasks if plan == "pairwise" else min(limit, default_branch_count(n_tasks))
    if not 2 <= n_branches <= limit:
        raise invalid(
            "branches",
            n_branches,
            f"an integer from 2 to {limit} for the {plan} plan with {n_tasks} tasks",
        )
    if keep is not None and n_branches != len(keep):
        raise invalid("branches", n_branches, f"{len(keep)} (the length of keep) or absent")
    if plan == "pairwise":
        if n_branches != n_tasks:
            raise invalid("branches", n_branches, f"{n_tasks} (one per task) for the pairwise plan")
        return pairwise_plan(target, ranked_auxiliaries)
    return pruned_plan(target, ranked_auxiliaries, n_branches, relevance, cut=cut, keep=keep)
