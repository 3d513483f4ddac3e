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

import contextlib
import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import optuna
from optuna.pruners import BasePruner

from fm_optuna.errors import invalid, one_of
from fm_optuna.search._base import (
    Candidates,
    MergeDecision,
    MergeStrategy,
    MergeTrial,
    SearchContext,
)
from fm_optuna.search._evaluation import (
    EVALUATION_CHUNKS,
    EVALUATIONS,
    PRUNE_SIGMAS,
    BoundPruner,
    ExampleRace,
    IncumbentPruner,
    score_in_chunks,
)


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
            score, fraction, stopped = score_in_chunks(
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
