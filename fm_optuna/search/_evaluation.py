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

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import optuna
from optuna.pruners import BasePruner
from optuna.trial import FrozenTrial, TrialState

from fm_optuna.errors import invalid

#: Λ ↦ its target score on consecutive validation chunks, lazily: (chunk score, examples).
ChunkScores = Callable[[np.ndarray, int], Iterator[tuple[float, int]]]
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


# --- chunk by chunk, by the noise-aware rule (problems without per-example scores) -----------

#: Trial attributes holding a candidate's per-chunk validation scores and example counts.
CHUNK_SCORES, CHUNK_EXAMPLES = "chunk_scores", "chunk_examples"
#: Default standard errors a candidate must trail the incumbent by before it is stopped.
PRUNE_SIGMAS = 2.0
#: How merge candidates may be scored (see :func:`search_merge`), the default first.
EVALUATIONS = ("exact", "full", "pruned")
#: Validation parts a candidate is scored in when it may be stopped early.
EVALUATION_CHUNKS = 4


class IncumbentPruner(BasePruner):
    """Stops a candidate that the validation chunks it has not seen could not plausibly rescue.

    After m of N validation examples, the candidate trails the best finished candidate (the
    incumbent) on the same examples by δ (a paired comparison: chunk noise shared by both
    cancels). If the two were equally good on the N − m examples left, the candidate would gain
    back m·δ only when the rest's summed paired difference exceeds it; that sum has standard
    deviation σ·√(N − m), with σ the per-example spread of paired differences, estimated from the
    chunk scores of the finished candidates (and this one's) against the incumbent. The candidate
    is stopped when

        δ > margin + sigmas · σ · √(N − m) / m,

    so the bar is high after one chunk and falls as the remaining chunks could add less. With
    ``sigmas = 0`` and ``margin = 0`` any deficit stops a candidate (the aggressive rule).
    """

    def __init__(self, margin: float = 0.0, sigmas: float = PRUNE_SIGMAS) -> None:
        if not margin >= 0.0:
            raise invalid("prune_margin", margin, "a non-negative number")
        if not sigmas >= 0.0 or not math.isfinite(sigmas):
            raise invalid("prune_sigmas", sigmas, "a non-negative number")
        self.margin, self.sigmas = margin, sigmas

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        seen = _chunks_of(trial)
        if not seen:
            return False
        finished = [
            t
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.value is not None and len(_chunks_of(t)) >= len(seen)
        ]
        if not finished:
            return False
        incumbent = max(finished, key=lambda t: (t.value, -t.number))
        reference = _chunks_of(incumbent)
        m = sum(count for _, count in seen)
        total = sum(count for _, count in reference)
        pairs = zip(seen, reference, strict=False)  # the incumbent has every chunk
        deficit = sum(count * (r - s) for (s, count), (r, _) in pairs) / m
        if deficit <= self.margin:
            return False
        others = [_chunks_of(t) for t in finished if t is not incumbent] + [seen]
        sigma = paired_spread(reference, others)
        return deficit > self.margin + self.sigmas * sigma * math.sqrt(max(total - m, 0)) / m


def _chunks_of(trial: FrozenTrial) -> list[tuple[float, int]]:
    """A candidate's (chunk score, examples) so far, from its user attributes."""
    scores = trial.user_attrs.get(CHUNK_SCORES, ())
    return list(zip(scores, trial.user_attrs.get(CHUNK_EXAMPLES, ()), strict=True))


def paired_spread(
    reference: Sequence[tuple[float, int]], others: Sequence[Sequence[tuple[float, int]]]
) -> float:
    """Per-example standard deviation of paired score differences against ``reference``.

    Each candidate with ≥ 2 chunks gives Σ_c n_c (d_c − d̄)² / (k − 1), d_c the chunk-score
    difference on chunk c (Var d_c = σ² / n_c); the estimates are averaged. Without any (only
    the incumbent finished, one chunk seen), the incumbent's own chunk spread stands in: an
    unpaired, so conservative, estimate.
    """

    def spread(differences: Sequence[tuple[float, int]]) -> float | None:
        if len(differences) < 2:
            return None
        total = sum(n for _, n in differences)
        mean = sum(d * n for d, n in differences) / total
        return sum(n * (d - mean) ** 2 for d, n in differences) / (len(differences) - 1)

    estimates = [
        spread([(s - r, n) for (s, n), (r, _) in zip(other, reference, strict=False)])
        for other in others
    ]
    variances = [v for v in estimates if v is not None and math.isfinite(v)]
    if not variances:
        variances = [v for v in [spread(list(reference))] if v is not None]
    return math.sqrt(sum(variances) / len(variances)) if variances else 0.0


def score_in_chunks(
    trial: optuna.Trial, weights: np.ndarray, chunk_scores: ChunkScores, chunks: int
) -> tuple[float, float, bool]:
    """Score ``weights`` chunk by chunk, reporting the running score; stop when pruned.

    Each chunk's score and size are kept as the trial's user attributes (what the pruner
    compares). Returns the running score, the share of the validation set scored and whether
    it was pruned.
    """
    total = examples = 0.0
    running = math.nan
    scores: list[float] = []
    counts: list[int] = []
    with contextlib.closing(chunk_scores(weights, chunks)) as parts:
        for step, (score, count) in enumerate(parts):
            total, examples = total + score * count, examples + count
            running = total / max(examples, 1e-12)
            if not math.isfinite(running):
                return running, (step + 1) / chunks, False
            scores.append(float(score))
            counts.append(int(count))
            trial.set_user_attr(CHUNK_SCORES, scores)
            trial.set_user_attr(CHUNK_EXAMPLES, counts)
            trial.report(running, step)
            if step + 1 < chunks and trial.should_prune():
                return running, (step + 1) / chunks, True
    return running, 1.0, False
