"""Exact pruned evaluation of merge candidates, for problems that score examples one by one.

A candidate's score is the mean of per-example scores, none above a known maximum (100 for an
accuracy in percent). After m of the N validation examples with summed score S, no candidate
can end above (S + (N − m) · maximum) / N. When that bound is not above the best finished
candidate's score, the candidate cannot be chosen (ties go to the earlier trial), so it is
stopped: unlike the noise-aware rule of :class:`IncumbentPruner`, no decision
changes, whatever the validation set's size.

What makes it pay is the order: near-optimal candidates agree on most examples, and differ on
those that some candidate already got wrong. Every example therefore carries a hardness (how far
below the maximum the candidates scored on it so far), and each candidate is scored hardest
examples first, in ``chunks`` parts: a candidate that loses does so on the first parts.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import optuna
from optuna.pruners import BasePruner
from optuna.trial import FrozenTrial, TrialState

#: Λ → a scorer of that candidate: examples' indices (``None``: all of them) → their scores.
ExampleScores = Callable[[np.ndarray], Callable[[np.ndarray | None], np.ndarray]]
#: Trial attribute holding the highest final score the candidate could still reach.
SCORE_BOUND = "score_bound"


class BoundPruner(BasePruner):
    """Stops a candidate whose highest reachable score (:data:`SCORE_BOUND`) is not above the
    ``rank``-th best finished candidate's score (the known single-branch scores included).

    With ``rank = 1`` the stopped candidate cannot be chosen. With the sampler's
    :meth:`~fm_optuna.search.MergeStrategy.decisive_ranks` it cannot enter the group of best
    candidates the sampler learns from either, so the search proposes what it would have
    proposed had the candidate been scored whole (a tie ranks the earlier trial first).
    """

    def __init__(self, rank: int = 1) -> None:
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank should be a positive integer, not {rank!r}")
        self.rank = rank

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        bound = trial.user_attrs.get(SCORE_BOUND)
        if bound is None:
            return False
        finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        values = [t.value for t in finished if t.value is not None and math.isfinite(t.value)]
        if len(values) < self.rank:
            return False
        return bound <= sorted(values, reverse=True)[self.rank - 1]


@dataclass
class ExampleRace:
    """Scores candidates hardest examples first and stops those that can no longer win.

    Attributes:
        scores: Per-example scores of a candidate (see :data:`ExampleScores`).
        maximum: The highest score one example can have.
        chunks: Parts each candidate's evaluation is split into (pruning is decided after each).
    """

    scores: ExampleScores
    maximum: float
    chunks: int
    #: Per example, how far below ``maximum`` the candidates scored so far (``None`` until the
    #: first candidate, scored whole, tells how many examples there are).
    hardness: np.ndarray | None = None

    def run(self, trial: optuna.Trial, weights: np.ndarray) -> tuple[float, float, bool]:
        """``weights``' score, the share of examples it was scored on, and whether it was
        stopped; each part's running score is reported to ``trial``."""
        scorer = self.scores(weights)
        if self.hardness is None:
            first = np.asarray(scorer(None), dtype=np.float64)
            self.hardness = np.zeros(len(first))
            self._learn(np.arange(len(first)), first)
            return float(first.mean()) if len(first) else math.nan, 1.0, False
        n = len(self.hardness)
        order = np.argsort(-self.hardness, kind="stable")
        total, seen = 0.0, 0
        for step, part in enumerate(np.array_split(order, self.chunks)):
            part_scores = np.asarray(scorer(part), dtype=np.float64)
            if not np.isfinite(part_scores).all():
                return math.nan, (seen + len(part)) / n, False
            self._learn(part, part_scores)
            total, seen = total + float(part_scores.sum()), seen + len(part)
            trial.set_user_attr(SCORE_BOUND, (total + (n - seen) * self.maximum) / n)
            trial.report(total / seen, step)
            if seen < n and trial.should_prune():
                return total / seen, seen / n, True
        return total / n, 1.0, False

    def _learn(self, index: np.ndarray, scores: np.ndarray) -> None:
        assert self.hardness is not None
        self.hardness[index] += self.maximum - scores
