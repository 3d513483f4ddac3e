"""What every merge search shares: the strategy base class and the records of a search.

A :class:`MergeStrategy` is an Optuna sampler over one parametrisation of the simplex (one file
per strategy under ``strategies/``); :class:`Candidates` is what a search measures a Λ with;
:class:`MergeTrial` and :class:`MergeDecision` are what it returns, saved with checkpoints and
merge problems (their ``to_dict``/``from_dict`` format is stable).
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import optuna
from optuna.samplers import BaseSampler

from fm_optuna.errors import invalid
from fm_optuna.search._evaluation import ChunkScores, ExampleScores

Design = Generator[np.ndarray, float, None]
#: Λ ↦ (validation loss, ∂loss/∂Λ): what a gradient-based strategy needs.
LossGradient = Callable[[np.ndarray], tuple[float, np.ndarray]]


@dataclass(frozen=True)
class Candidates:
    """How a merge search measures a candidate Λ.

    Attributes:
        score: The target validation score of Σ Λ_b θ_b on the whole validation split.
        chunk_scores: ``(Λ, n)`` → the score on each of ``n`` consecutive validation chunks with
            its example count, computed lazily; their size-weighted mean is ``score``. ``None``:
            the problem cannot split its validation set, so candidates are scored whole.
        loss_gradient: Λ → (differentiable validation loss, its gradient in Λ), or ``None``.
        example_scores: Λ → a scorer of its examples (see ``search._evaluation``), with
            ``example_score_max`` the highest score of one example; ``None``: not offered.
    """

    score: Callable[[np.ndarray], float]
    chunk_scores: ChunkScores | None = None
    loss_gradient: LossGradient | None = None
    example_scores: ExampleScores | None = None
    example_score_max: float = math.inf


@dataclass(frozen=True)
class MergeTrial:
    """One evaluated candidate: Λ, its validation score (NaN when non-finite) and its state."""

    number: int
    weights: tuple[float, ...]
    score: float
    state: str
    #: "evaluated" by this search, or "branch": a single branch whose score was already known.
    source: str = "evaluated"
    #: Share of the validation set this candidate was scored on (< 1 when pruned: ``score`` is
    #: then the running score on that share, never compared with full scores).
    fraction: float = 1.0


@dataclass(frozen=True)
class MergeDecision:
    """The outcome of one merge search.

    Attributes:
        weights: The chosen Λ (non-negative, sums to 1).
        score: Target validation score of the merged model with ``weights``.
        trials: Every candidate the strategy evaluated, in order.
        seconds: Wall time of the search (evaluations included).
        strategy: Name of the strategy that searched.
        fallback: Why the search's best was not used (every candidate non-finite), else ``None``.
    """

    weights: tuple[float, ...]
    score: float
    trials: tuple[MergeTrial, ...]
    seconds: float
    strategy: str
    fallback: str | None = None

    @property
    def n_trials(self) -> int:
        """Candidates this search evaluated (known single-branch scores excluded)."""
        return sum(1 for t in self.trials if t.source == "evaluated")

    @property
    def validation_passes(self) -> float:
        """Validation forwards spent, in whole validation sets (pruned candidates count part)."""
        return sum(t.fraction for t in self.trials if t.source == "evaluated")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MergeDecision:
        return cls(
            weights=tuple(data["weights"]),
            score=float(data["score"]),
            trials=tuple(
                MergeTrial(
                    int(t["number"]),
                    tuple(t["weights"]),
                    float(t["score"]),
                    str(t["state"]),
                    str(t.get("source", "evaluated")),
                    float(t.get("fraction", 1.0)),
                )
                for t in data["trials"]
            ),
            seconds=float(data["seconds"]),
            strategy=str(data["strategy"]),
            fallback=data.get("fallback"),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "weights": list(self.weights),
            "score": self.score,
            "seconds": self.seconds,
            "fallback": self.fallback,
            "trials": [
                {
                    "number": t.number,
                    "weights": list(t.weights),
                    "score": t.score,
                    "state": t.state,
                    "source": t.source,
                    "fraction": t.fraction,
                }
                for t in self.trials
            ],
        }


@dataclass(frozen=True)
class SearchContext:
    """What a strategy may know when it builds its sampler."""

    n_branches: int
    budget: int
    seed: int
    branch_scores: tuple[float, ...]  # each branch's own target validation score
    warm_start: tuple[float, ...] | None = None
    loss_gradient: LossGradient | None = None  # for strategies with ``needs_loss_gradient``

    @property
    def greedy_order(self) -> list[int]:
        """Branch indices by decreasing own score; NaN last; ties by index (deterministic)."""

        def key(i: int) -> tuple[float, int]:
            score = self.branch_scores[i]
            return (-score if math.isfinite(score) else math.inf, i)

        return sorted(range(self.n_branches), key=key)


class MergeStrategy(abc.ABC):
    """How to choose Λ: a sampler plus the parametrisation it samples.

    Subclasses live one per file in ``search/strategies/`` and are registered by ``name``.
    """

    name: ClassVar[str]
    #: Whether the previous round's Λ* is enqueued as the first trial of the next round, and
    #: the single branches' known scores are given to the sampler as completed trials (free:
    #: the loop has already evaluated every branch). Exhaustive and scripted designs opt out.
    uses_warm_start: ClassVar[bool] = False
    #: Whether the strategy follows the gradient of a differentiable validation loss, which only
    #: problems with ``target_loss`` offer (checked before training).
    needs_loss_gradient: ClassVar[bool] = False

    @abc.abstractmethod
    def n_trials(self, n_branches: int, budget: int) -> int:
        """How many candidates one merge evaluates (some designs ignore ``budget``)."""

    @abc.abstractmethod
    def sampler(self, context: SearchContext) -> BaseSampler: ...

    @abc.abstractmethod
    def suggest(self, trial: optuna.Trial, n_branches: int) -> np.ndarray:
        """Read Λ (a simplex point) from the trial's parameters."""

    def warm_start_params(self, weights: np.ndarray) -> dict[str, Any] | None:
        """Parameters that make :meth:`suggest` return ``weights`` (``None``: cannot warm start)."""
        return None

    def decisive_ranks(self, n_trials: int) -> int | None:
        """How many of the best finished candidates the sampler's proposals and the decision
        depend on, in a study of at most ``n_trials`` candidates; ``None``: every candidate's
        score does.

        A candidate that certainly ends below that many finished ones can be stopped without
        changing anything the search does (``evaluation = "exact"``). Samplers that ignore
        scores (grid, random) depend on the best one only; TPE on its "good" group.
        """
        return None

    def check(self, n_branches: int, budget: int) -> None:
        """Raise :class:`ConfigError` when the budget cannot work for this many branches."""
        if budget < 1:
            raise invalid("merge_trials", budget, "a positive integer")


# --- parametrisations of the simplex -------------------------------------------------------
