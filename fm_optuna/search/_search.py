"""The merge step as an inner Optuna study over Λ on the simplex.

Every strategy is an Optuna sampler over one parametrisation of the simplex, so every merge
decision is an in-memory study whose trials can be inspected. Adaptive designs (binary search,
the paper's greedy Algorithm 3) are samplers too: :class:`DesignSampler` asks a generator for
the next point and feeds it the previous trial's score.

Entry point: :func:`search_merge`. What it searches over is :class:`Candidates`: the full
validation score of a Λ and, when the problem offers them, its per-example scores (for the
default exact evaluation, and pruned evaluation), its score chunk by chunk (pruned evaluation)
and the gradient of a differentiable validation loss (for ``gradient``).
"""

from __future__ import annotations

import abc
import contextlib
import math
import time
import warnings
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, FloatDistribution
from optuna.pruners import BasePruner
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial, TrialState

from fm_optuna.core._merging import normalise
from fm_optuna.errors import invalid, one_of
from fm_optuna.search._evaluation import BoundPruner, ExampleRace, ExampleScores

Design = Generator[np.ndarray, float, None]
#: Λ ↦ (validation loss, ∂loss/∂Λ): what a gradient-based strategy needs.
LossGradient = Callable[[np.ndarray], tuple[float, np.ndarray]]
#: Λ ↦ its target score on consecutive validation chunks, lazily: (chunk score, examples).
ChunkScores = Callable[[np.ndarray, int], Iterator[tuple[float, int]]]


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


class StickBreaking:
    """Λ_i = s_i Π_{j<i}(1 − s_j), last gets the rest: n−1 params in [0, 1], suits TPE/CMA-ES."""

    @staticmethod
    def suggest(trial: optuna.Trial, n: int) -> np.ndarray:
        sticks = [trial.suggest_float(f"s{i}", 0.0, 1.0) for i in range(n - 1)]
        return StickBreaking.to_simplex(sticks)

    @staticmethod
    def to_simplex(sticks: Sequence[float]) -> np.ndarray:
        weights, remaining = [], 1.0
        for s in sticks:
            weights.append(remaining * s)
            remaining *= 1.0 - s
        weights.append(remaining)
        return normalise(weights)

    @staticmethod
    def params(weights: np.ndarray) -> dict[str, float]:
        params, remaining = {}, 1.0
        for i, w in enumerate(weights[:-1]):
            s = 1.0 if remaining <= 1e-12 else min(1.0, max(0.0, float(w) / remaining))
            params[f"s{i}"] = s
            remaining -= float(w)
        return params


class FlatDirichlet:
    """Λ_i = −log u_i / Σ_j −log u_j: n params; uniform u gives a uniform point on the simplex."""

    LOW = 1e-12

    @staticmethod
    def suggest(trial: optuna.Trial, n: int) -> np.ndarray:
        u = [trial.suggest_float(f"u{i}", FlatDirichlet.LOW, 1.0) for i in range(n)]
        return normalise(-np.log(u))

    @staticmethod
    def params(weights: np.ndarray) -> dict[str, float]:
        return {f"u{i}": float(max(FlatDirichlet.LOW, math.exp(-w))) for i, w in enumerate(weights)}


class RawWeights:
    """Unnormalised non-negative weights w_i ∈ [0, 1], Λ = w / Σ w: what the designs propose."""

    @staticmethod
    def space(n: int) -> dict[str, BaseDistribution]:
        return {f"w{i}": FloatDistribution(0.0, 1.0) for i in range(n)}

    @staticmethod
    def suggest(trial: optuna.Trial, n: int) -> np.ndarray:
        return normalise([trial.suggest_float(f"w{i}", 0.0, 1.0) for i in range(n)])


class DesignSampler(BaseSampler):
    """Runs an adaptive design as a sampler: each trial's point comes from ``design``, which is
    sent the previous trial's score (``-inf`` when that trial failed)."""

    def __init__(self, design: Design, n_branches: int) -> None:
        self._design = design
        self._n = n_branches
        self._started = False

    def infer_relative_search_space(
        self, study: optuna.Study, trial: FrozenTrial
    ) -> dict[str, BaseDistribution]:
        return RawWeights.space(self._n)

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        if not self._started:
            self._started = True
            point = next(self._design)
        else:
            previous = study.get_trials(deepcopy=False)[trial.number - 1]
            score = previous.value if previous.state == TrialState.COMPLETE else -math.inf
            point = self._design.send(float(score))  # type: ignore[arg-type]
        return {f"w{i}": float(v) for i, v in enumerate(point)}

    def sample_independent(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        param_name: str,
        param_distribution: BaseDistribution,
    ) -> Any:
        raise RuntimeError(f"DesignSampler proposes whole points; unexpected param {param_name}")


@contextlib.contextmanager
def quiet_optuna(level: int = optuna.logging.ERROR) -> Iterator[None]:
    """Optuna logs only at ``level`` and above, and no ExperimentalWarning, inside the block.

    Inner studies use ERROR: they print nothing, not even the warning for a NaN trial.
    """
    previous = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(level)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            yield
    finally:
        optuna.logging.set_verbosity(previous)


def _add_known_branches(
    study: optuna.Study, strategy: MergeStrategy, context: SearchContext, records: list[MergeTrial]
) -> None:
    """Tell the sampler each single branch's score, already measured by the loop, at no cost.

    This makes the decision never worse than the best single branch, as grid and greedy are.
    """
    probe = optuna.create_study()  # only to learn the strategy's distributions for its params
    for index, score in enumerate(context.branch_scores):
        vertex = np.eye(context.n_branches)[index]
        params = strategy.warm_start_params(vertex)
        if params is None or not math.isfinite(score):
            continue
        probe.enqueue_trial(params)
        trial = probe.ask()
        weights = strategy.suggest(trial, context.n_branches)
        study.add_trial(
            optuna.trial.create_trial(
                params=trial.params, distributions=trial.distributions, value=score
            )
        )
        records.append(
            MergeTrial(
                len(records), tuple(float(w) for w in weights), float(score), "COMPLETE", "branch"
            )
        )


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


def _score_in_chunks(
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


def _evaluation_plan(
    candidates: Candidates,
    strategy: MergeStrategy,
    evaluation: str,
    chunks: int,
    n_trials: int,
    incumbent_pruner: IncumbentPruner,
) -> tuple[ExampleRace | None, BasePruner]:
    """How a search scores its candidates: raced example by example (with the pruner that stops
    them), chunk by chunk under ``incumbent_pruner``, or whole (no race, no pruner)."""
    if evaluation not in EVALUATIONS:
        raise one_of("evaluation", evaluation, EVALUATIONS)
    if not isinstance(chunks, int) or chunks < 1:
        raise invalid("evaluation_chunks", chunks, "a positive integer")
    whole = None, optuna.pruners.NopPruner()
    if evaluation == "full" or chunks == 1:
        return whole
    if candidates.example_scores is not None:
        rank = 1 if evaluation == "pruned" else strategy.decisive_ranks(n_trials)
        if rank is None:
            return whole
        race = ExampleRace(candidates.example_scores, candidates.example_score_max, chunks)
        return race, BoundPruner(rank)
    if evaluation == "pruned" and candidates.chunk_scores is not None:
        return None, incumbent_pruner
    return whole


def search_merge(
    evaluate: Callable[[np.ndarray], float] | Candidates,
    *,
    strategy: MergeStrategy,
    n_branches: int,
    budget: int,
    seed: int,
    branch_scores: Sequence[float],
    warm_start: Sequence[float] | None = None,
    evaluation: str = "exact",
    chunks: int = EVALUATION_CHUNKS,
    prune_margin: float = 0.0,
    prune_sigmas: float = PRUNE_SIGMAS,
) -> MergeDecision:
    """Choose Λ maximising ``evaluate`` (the target validation score of Σ Λ_b θ_b).

    Non-finite scores are recorded as failed trials and never chosen; ties go to the earliest
    trial. If every candidate is non-finite, the best single branch (by ``branch_scores``) is
    kept and the decision says so in ``fallback``.

    ``evaluation`` says how candidates are scored (only fully evaluated ones can be chosen, so
    the decision's score is always a full evaluation):

    - ``"exact"``: candidates whose examples are scored one by one are scored in ``chunks``
      parts, hardest examples first, and stopped once they can matter neither to the decision
      nor to the sampler's later proposals (:meth:`MergeStrategy.decisive_ranks`,
      ``search._evaluation``): the search does what ``"full"`` does, for fewer forwards.
      Other candidates, and strategies whose sampler learns from every score, score whole.
    - ``"full"``: every candidate on the whole validation set.
    - ``"pruned"``: stop candidates once they cannot win, even if the sampler's later
      proposals change: exactly where examples are scored one by one; chunk by chunk otherwise,
      by :class:`IncumbentPruner` (a candidate trailing the best finished one by more than
      ``prune_margin`` plus ``prune_sigmas`` standard errors of what the remaining chunks could
      add).

    Example:
        >>> from fm_optuna.search.strategies import make_strategy
        >>> d = search_merge(lambda lam: -abs(lam[0] - 0.3), strategy=make_strategy("grid"),
        ...                  n_branches=2, budget=1, seed=0, branch_scores=(0.0, 0.0))
        >>> [round(w, 1) for w in d.weights]
        [0.3, 0.7]
    """
    candidates = evaluate if isinstance(evaluate, Candidates) else Candidates(score=evaluate)
    strategy.check(n_branches, budget)
    if strategy.needs_loss_gradient and candidates.loss_gradient is None:
        raise invalid(
            "strategy", strategy.name, "a strategy the problem supports (it has no target_loss)"
        )
    race, pruner = _evaluation_plan(
        candidates,
        strategy,
        evaluation,
        chunks,
        strategy.n_trials(n_branches, budget) + n_branches + 1,  # + known branches, warm start
        IncumbentPruner(prune_margin, prune_sigmas),
    )
    pruned = isinstance(pruner, IncumbentPruner)
    started = time.perf_counter()
    context = SearchContext(
        n_branches=n_branches,
        budget=budget,
        seed=seed,
        branch_scores=tuple(float(s) for s in branch_scores),
        warm_start=None if warm_start is None else tuple(float(w) for w in warm_start),
        loss_gradient=candidates.loss_gradient,
    )
    records: list[MergeTrial] = []

    def objective(trial: optuna.Trial) -> float:
        weights = strategy.suggest(trial, n_branches)
        if race is not None:
            score, fraction, stopped = race.run(trial, weights)
        elif pruned:
            assert candidates.chunk_scores is not None
            score, fraction, stopped = _score_in_chunks(
                trial, weights, candidates.chunk_scores, chunks
            )
        else:
            score, fraction, stopped = float(candidates.score(weights)), 1.0, False
        finite = math.isfinite(score)
        state = "PRUNED" if stopped else "COMPLETE" if finite and fraction == 1.0 else "FAIL"
        records.append(
            MergeTrial(
                number=len(records),
                weights=tuple(float(w) for w in weights),
                score=score if finite else math.nan,
                state=state,
                fraction=fraction,
            )
        )
        if stopped:
            raise optuna.TrialPruned(f"trails the best candidate after {fraction:.0%} of val")
        # A non-finite value makes Optuna mark the trial FAIL, so samplers never learn from it.
        return score if state == "COMPLETE" else math.nan

    with quiet_optuna():
        study = optuna.create_study(
            direction="maximize",
            sampler=strategy.sampler(context),
            pruner=pruner,
        )
        if strategy.uses_warm_start:
            _add_known_branches(study, strategy, context, records)
            if context.warm_start is not None:
                params = strategy.warm_start_params(np.asarray(context.warm_start))
                if params is not None:
                    study.enqueue_trial(params, skip_if_exists=True)
        study.optimize(objective, n_trials=strategy.n_trials(n_branches, budget), catch=())

    finite = [t for t in records if t.state == "COMPLETE"]
    if any(t.source == "evaluated" for t in finite):
        best = max(finite, key=lambda t: (t.score, -t.number))
        weights, score, fallback = best.weights, best.score, None
    else:
        index = context.greedy_order[0]
        weights = tuple(1.0 if i == index else 0.0 for i in range(n_branches))
        score = context.branch_scores[index]
        fallback = f"every candidate scored non-finite; kept the best single branch #{index}"
    return MergeDecision(
        weights=weights,
        score=score,
        trials=tuple(records),
        seconds=time.perf_counter() - started,
        strategy=strategy.name,
        fallback=fallback,
    )
