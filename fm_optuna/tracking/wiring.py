"""MLflow wired to a problem: the observers the command line and the public API both attach.

Each function opens its store first (before any training: an unreachable store is one line and
no lost work; a new database of ``run`` finishes its preparation in the background) and returns
observers that know the target's direction.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from fm_optuna.tracking.comparison import ComparisonTracking
from fm_optuna.tracking.observer import MlflowTracker
from fm_optuna.tracking.store import TrackingStore, default_experiment_name, open_store
from fm_optuna.tracking.study_run import StudyTracking

if TYPE_CHECKING:
    from fm_optuna.problem._tasks import Problem


def _higher_is_better(problem: Problem) -> bool:
    return problem.task(problem.target).higher_is_better


def open_run_store(
    uri: str | None, problem: Problem, experiment: str | None = None
) -> TrackingStore:
    """The store of ``fm-optuna run`` and ``fm_optuna.train_forkmerge``: experiment
    ``fm-optuna/<problem>-<target>`` unless named. A new database is checked here and prepared
    while the pre-pass and the first round run (the tracker writes once it is ready)."""
    name = experiment or default_experiment_name(problem.name, problem.target)
    return open_store(uri, experiment=name, background=True)


def run_tracker(store: TrackingStore, problem: Problem) -> MlflowTracker:
    """An observer logging one invocation's runs (methods, branches, Λ) to ``store``."""
    return MlflowTracker(store, higher_is_better=_higher_is_better(problem))


def open_comparison(
    uri: str | None,
    problem: Problem,
    *,
    kind: str,
    study: str,
    tag: str,
    params: Mapping[str, Any],
    experiment: str | None = None,
) -> ComparisonTracking:
    """The parent run of one ``compare`` / ``compare-methods`` invocation in ``experiment``
    (default ``fm-optuna/<kind>/<study>``); its ``observers(value, seed)`` track each compared
    run under it (tagged ``tag=<value>``) and ``active()`` ends it with the command."""
    store = open_store(uri, experiment=experiment or f"fm-optuna/{kind}/{study}")
    return ComparisonTracking(
        store,
        kind=kind,
        study=study,
        tag=tag,
        higher_is_better=_higher_is_better(problem),
        params=params,
    )


def study_tracking(uri: str | None, study_name: str) -> Callable[[Problem], StudyTracking]:
    """What :class:`~fm_optuna.study.Tuner` takes as ``tracking``: once the problem is built and
    checked, open experiment ``fm-optuna/study/<study name>`` (one parent run per study)."""

    def open_for(problem: Problem) -> StudyTracking:
        store = open_store(uri, experiment=f"fm-optuna/study/{study_name}")
        return StudyTracking(store, study_name, higher_is_better=_higher_is_better(problem))

    return open_for
