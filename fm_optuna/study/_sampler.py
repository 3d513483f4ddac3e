"""The outer study's sampler: seeded per trial, and never a configuration tried already.

Every worker of a shared study, and every later invocation that extends or resumes one, used to
build its sampler with the study's seed: their start-up samples restarted from the same draws
and proposed configurations already finished or running. Here the sampler is rebuilt for each
trial with a seed derived from the study's seed *and the trial number* (unique in a study,
whoever runs it), so

- a study run by one worker from scratch with a seed proposes the same trials every time (the
  trial numbers, and so the seeds, are 0, 1, 2, ...; TPE sees the same history);
- workers started together, or invocations after a crash, draw from different streams;
- a proposal equal to the parameters of another trial of the study (complete, pruned, running
  or waiting; not a FAIL one, whose configuration is retried rather than blocked) is drawn
  again, and once the sampler keeps repeating itself an untried point of the space is taken at
  random; a configuration repeats only when the space is exhausted.

What is *not* reproducible: with several workers, which worker gets which trial number (and so
which trials see which history) depends on timing. TPE runs with ``constant_liar`` so a
worker's proposal already accounts for the other workers' running trials.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial, TrialState

if TYPE_CHECKING:
    from collections.abc import Sequence

    import optuna

#: Proposals drawn from the sampler before an untried point is taken at random.
ATTEMPTS = 20
#: Spaces up to this many points are enumerated to find an untried one.
ENUMERABLE = 100_000

Key = tuple[tuple[str, float], ...]
#: The trials whose configuration is taken.
_BLOCKING = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)


def trial_seed(seed: int, number: int) -> int:
    """The seed of trial ``number`` in a study seeded with ``seed`` (independent streams)."""
    return int(np.random.SeedSequence([seed, number]).generate_state(1)[0])


def _points(distribution: BaseDistribution) -> Sequence[Any] | None:
    if isinstance(distribution, IntDistribution):
        return range(distribution.low, distribution.high + 1, distribution.step)
    if isinstance(distribution, CategoricalDistribution):
        return distribution.choices
    if isinstance(distribution, FloatDistribution) and distribution.step is not None:
        n = math.floor((distribution.high - distribution.low) / distribution.step + 1e-9) + 1
        return [distribution.low + i * distribution.step for i in range(n)]
    return None  # a continuous range: a repeat has probability zero


class DistinctSampler(BaseSampler):
    """Wraps a sampler made per trial by ``make(seed)``; proposals repeat no other trial's.

    Args:
        make: Builds the underlying sampler from a seed (e.g. ``TPESampler(seed=...)``).
        seed: The study's seed.
        space: Every parameter the objective suggests, with the distribution it suggests it
            from (the objective must use exactly these).
    """

    def __init__(
        self,
        make: Callable[[int], BaseSampler],
        *,
        seed: int,
        space: Mapping[str, BaseDistribution],
    ) -> None:
        self._make, self._seed, self._space = make, seed, dict(space)
        self._base = make(seed)
        self._rng = np.random.default_rng(seed)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self._base = self._make(trial_seed(self._seed, trial.number))
        self._rng = np.random.default_rng(trial_seed(self._seed, trial.number) + 1)
        self._base.before_trial(study, trial)

    def infer_relative_search_space(
        self, study: optuna.Study, trial: FrozenTrial
    ) -> dict[str, BaseDistribution]:
        return dict(self._space)

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        if not search_space or "fixed_params" in trial.system_attrs:
            return {}  # an enqueued trial (e.g. a dead worker's retry) keeps its parameters
        taken = self._taken(study, trial)
        params: dict[str, Any] = {}
        for _ in range(ATTEMPTS):
            params = self._propose(study, trial)
            if self._key(params) not in taken:
                return params
        return self._untried(taken) or params  # exhausted: a repeat is all that is left

    def sample_independent(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        param_name: str,
        param_distribution: BaseDistribution,
    ) -> Any:
        return self._base.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        state: TrialState,
        values: Sequence[float] | None,
    ) -> None:
        self._base.after_trial(study, trial, state, values)

    def _propose(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, Any]:
        base_space = self._base.infer_relative_search_space(study, trial)
        params = dict(self._base.sample_relative(study, trial, base_space))
        for name, distribution in self._space.items():
            if name not in params:
                params[name] = self._base.sample_independent(study, trial, name, distribution)
        return {name: params[name] for name in self._space}

    def _key(self, params: Mapping[str, Any]) -> Key:
        return tuple(
            (name, distribution.to_internal_repr(params[name]))
            for name, distribution in sorted(self._space.items())
        )

    def _taken(self, study: optuna.Study, trial: FrozenTrial) -> set[Key]:
        taken = set()
        # A FAIL trial blocks nothing: an interrupted or faulted configuration is tried again.
        for other in study.get_trials(deepcopy=False, states=_BLOCKING):
            params = dict(other.params)
            params.update(other.system_attrs.get("fixed_params", {}))  # waiting retries
            if other.number != trial.number and set(self._space) <= set(params):
                try:
                    taken.add(self._key(params))
                except ValueError:  # a choice the space no longer has: it blocks nothing now
                    continue
        return taken

    def _untried(self, taken: set[Key]) -> dict[str, Any] | None:
        names = sorted(self._space)
        axes = []
        for name in names:
            points = _points(self._space[name])
            if points is None:
                return None
            axes.append(points)
        if math.prod(len(axis) for axis in axes) > ENUMERABLE:
            return None
        candidates = (dict(zip(names, point, strict=True)) for point in itertools.product(*axes))
        untried = [params for params in candidates if self._key(params) not in taken]
        if not untried:
            return None
        return untried[int(self._rng.integers(len(untried)))]
