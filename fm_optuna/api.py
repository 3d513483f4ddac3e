"""The library's verbs: train ForkMerge, compare methods, tune Δt and L, search Λ.

Every call checks the problem first (:func:`~fm_optuna.problem.check_problem`): a mistake is one
:class:`~fm_optuna.errors.ConfigError` before any training and before any store is opened.

:func:`train_forkmerge` and :func:`tune` take a built problem (it trains where it lives) or a
factory called as ``factory(device=...)`` with ``device``: one device, or with
``parallel_branches`` one per branch (``device="cuda:0,cuda:1"``, the problem built once on
each; see :mod:`fm_optuna.core._devices`), checked as ``--device`` and a study file's
``device`` are.
MLflow tracking is optional: give ``tracking_uri`` (or set ``MLFLOW_TRACKING_URI``); every run a
call opens ends FINISHED, or FAILED when training raises.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from fm_optuna.config import ForkMergeConfig, RuntimeOptions, StudyOptions
from fm_optuna.core._devices import normalised, resolve_devices
from fm_optuna.core._events import EventStream, Observer
from fm_optuna.core._loop import ForkMergeResult, run_forkmerge
from fm_optuna.core._training import use_threads
from fm_optuna.errors import ConfigError, invalid
from fm_optuna.experiments._run_methods import REFERENCES
from fm_optuna.problem._checks import check_problem
from fm_optuna.problem._tasks import Problem, for_plan
from fm_optuna.search._base import MergeDecision, MergeStrategy
from fm_optuna.search._search import search_merge as _search_merge
from fm_optuna.search.strategies import make_strategy
from fm_optuna.study._spec import (
    ProblemSection,
    SpaceSection,
    StudySpec,
    check_branches_fit,
    parse_space,
)

if TYPE_CHECKING:
    import optuna
    from optuna.pruners import BasePruner
    from optuna.samplers import BaseSampler

    from fm_optuna.experiments._compare_methods import MethodsComparison
    from fm_optuna.study._tuner import TuneReport


def _tracking_uri(uri: str | None) -> str | None:
    """The store to log to: ``uri``, else ``MLFLOW_TRACKING_URI``, else none (no tracking)."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or None


def _use_threads(threads: int | None) -> None:
    RuntimeOptions(threads=threads)  # checked as every door checks it
    use_threads(threads)


#: A problem built where it is asked for, called as ``factory(device=...)``: a problem
#: factory's ``functools.partial(build, target="progression")``, or ``lambda device: ...``.
ProblemFactory = Callable[..., Problem]


def _on_devices(
    problem: Problem | ProblemFactory, device: str | None, config: ForkMergeConfig
) -> tuple[Problem, tuple[Problem, ...]]:
    """The problem on each device ``device`` names (first, the rest): a built problem stays
    where it was built (``device`` may only name that); a factory is called once per device."""
    RuntimeOptions(device=device)  # checked as every door checks it
    if isinstance(problem, Problem):
        if device is not None:
            named = resolve_devices(device, parallel=config.parallel_branches)
            if named != (normalised(problem.device),):
                raise invalid(
                    "device",
                    device,
                    f"absent or {problem.device}, where `problem` was built (give a factory "
                    "called as factory(device=...) to train elsewhere or on several devices)",
                )
        return problem, ()
    if not callable(problem):
        raise invalid(
            "problem", repr(problem)[:60], "a Problem or a factory called as factory(device=...)"
        )
    devices = resolve_devices(device, parallel=config.parallel_branches)
    built = [problem(device=where) for where in devices]
    for replica in built[1:]:
        check_problem(replica)
    return built[0], tuple(built[1:])


def _check(problem: Problem, config: ForkMergeConfig) -> None:
    """The problem's contract, then L against its tasks: nothing trained or opened yet."""
    from fm_optuna.core._branches import make_plan

    check_problem(problem)
    planned = for_plan(problem, config.plan)
    make_plan(
        "pruned" if config.plan == "joint" else config.plan,
        target=planned.target,
        ranked_auxiliaries=planned.auxiliaries,
        n_branches=config.branches,
    )


def train_forkmerge(
    problem: Problem | ProblemFactory,
    config: ForkMergeConfig | None = None,
    *,
    device: str | None = RuntimeOptions.device,
    tracking_uri: str | None = None,
    experiment: str | None = None,
    observers: Iterable[Observer] = (),
    threads: int | None = RuntimeOptions.threads,
) -> ForkMergeResult:
    """Train ForkMerge on ``problem`` and return the final model with every merge decision.

    Args:
        problem: Your :class:`~fm_optuna.problem.Problem` (checked before anything runs), or a
            factory called as ``factory(device=...)``, e.g. ``functools.partial(build,
            target="progression")`` (see ``device``).
        config: Δt, T, L, the merge strategy, ... (default: ``ForkMergeConfig()``).
        device: With a factory, where it builds the problem: a torch device (default: CUDA
            when there is one, else the CPU) or, with ``config.parallel_branches``, CUDA devices
            separated by commas, one per branch (``"cuda:0,cuda:1"``: branch i on device
            i mod n, the merge on the first), as ``--device``. A built problem trains where
            it lives.
        tracking_uri: MLflow store to log the run, its branches and Λ to (default:
            ``MLFLOW_TRACKING_URI``; neither: nothing is logged).
        experiment: MLflow experiment (default: ``fm-optuna/<problem>-<target>``).
        observers: Extra :class:`~fm_optuna.core.Observer` s of the event stream.
        threads: Intra-op CPU threads (``None``: torch's own setting), as ``--threads``.

    Returns:
        :class:`~fm_optuna.core.ForkMergeResult`: ``model`` (final), ``decisions`` (every
        merge's Λ, score and inner trials), ``lambda_history``, ``steps``, ``branches``,
        ``summary`` (the final model's validation and test metrics of every task).

    Raises:
        ConfigError: The problem breaks its contract, L does not fit its tasks, or the store
            cannot be opened.

    Example:
        >>> import fm_optuna
        >>> from examples.diabetes import build
        >>> result = fm_optuna.train_forkmerge(
        ...     build(target="progression"), fm_optuna.ForkMergeConfig(dt=20, total_steps=40))
        >>> len(result.lambda_history)
        2
    """
    config = config or ForkMergeConfig()
    problem, replicas = _on_devices(problem, device, config)
    _check(problem, config)
    _use_threads(threads)
    uri = _tracking_uri(tracking_uri)
    events = EventStream(list(observers))
    store = None
    if uri is not None:
        from fm_optuna.tracking import open_run_store, run_tracker

        store = open_run_store(uri, problem, experiment)
        events.observers.append(run_tracker(store, problem))
    try:
        # The run ends itself (FINISHED or FAILED).
        return run_forkmerge(problem, config, events, replicas=replicas)
    finally:
        events.close()


def compare_methods(
    problem: Problem,
    config: ForkMergeConfig | None = None,
    *,
    methods: Sequence[str] = ("stl", "ew", "forkmerge"),
    seeds: Sequence[int] = (0,),
    references: str = "target",
    tracking_uri: str | None = None,
    experiment: str | None = None,
    threads: int | None = RuntimeOptions.threads,
) -> MethodsComparison:
    """Train STL, EW, the baselines and ForkMerge with one budget; TG, Δm and negative transfer.

    Args:
        problem: Your problem (checked first).
        config: The shared budget and ForkMerge's settings (``seed`` is replaced by ``seeds``).
        methods: Any of ``METHODS`` (``stl``, ``ew``, ``pcgrad``, ...,
            ``forkmerge``).
        seeds: One run of every method per seed.
        references: ``target`` (STL of the target is the reference) or ``tasks`` (STL trained
            for every task, so Δm covers every task a multi-task model serves).
        tracking_uri: MLflow store (default ``MLFLOW_TRACKING_URI``; neither: no tracking).
        experiment: MLflow experiment (default ``fm-optuna/compare-methods/<problem>``).
        threads: Intra-op CPU threads (``None``: torch's own setting), as ``--threads``.

    Returns:
        :class:`~fm_optuna.experiments.MethodsComparison`; ``rows()`` is the table, ``save(folder)``
        writes CSV and JSON.

    Example:
        >>> from examples.diabetes import build
        >>> report = compare_methods(build(target="progression"),
        ...                          ForkMergeConfig(dt=20, total_steps=40), methods=("stl", "ew"))
        >>> [row["method"] for row in report.rows()]
        ['stl', 'ew']
    """
    from fm_optuna.experiments._compare_methods import compare_methods as compare

    config = config or ForkMergeConfig()
    if references not in REFERENCES:
        raise invalid("references", references, "one of " + ", ".join(REFERENCES))
    if "forkmerge" in methods:
        _check(problem, config)
    else:
        check_problem(problem)
    _use_threads(threads)
    uri = _tracking_uri(tracking_uri)
    if uri is None:
        return compare([problem], config, tuple(methods), list(seeds), references=references)
    from fm_optuna.tracking import open_comparison

    tracking = open_comparison(
        uri,
        problem,
        kind="compare-methods",
        study=problem.name,
        tag="target",
        params={**config.as_params(), "methods": ",".join(methods), "seeds": list(seeds)},
        experiment=experiment,
    )
    with tracking.active():
        return compare(
            [problem],
            config,
            tuple(methods),
            list(seeds),
            references=references,
            observers=tracking.observers,
        )


def tune(
    problem: Problem | ProblemFactory,
    space: Mapping[str, Any] | SpaceSection,
    *,
    study_name: str,
    config: ForkMergeConfig | None = None,
    device: str | None = RuntimeOptions.device,
    storage: str = StudyOptions.storage,
    n_trials: int = StudyOptions.n_trials,
    sampler: BaseSampler | None = None,
    pruner: BasePruner | None = None,
    seed: int | None = None,
    tracking_uri: str | None = StudyOptions.tracking_uri,
    checkpoint_dir: str = StudyOptions.checkpoint_dir,
    threads: int | None = RuntimeOptions.threads,
    callbacks: Sequence[Callable[[optuna.Study, optuna.trial.FrozenTrial], None]] = (),
    allow_config_change: bool = False,
) -> TuneReport:
    """Create or resume the outer Optuna study: each trial trains ForkMerge with suggested Δt, L.

    Finished trials are kept; the study grows to ``n_trials`` finished trials. Each trial reports
    the target's validation score after every merge (so ``pruner`` can stop it), saves its final
    model, and stores its Λ trajectory as the user attribute ``lambda_history``.

    Args:
        problem: Your problem (checked before the storage is opened: a mistake leaves no trial),
            or a factory called as ``factory(device=...)``.
        space: What to search, with the keys of a study file's ``[space]``: ``dt`` and
            ``branches`` as ``{"low": .., "high": .., "log": ..}``, ``lr`` likewise,
            ``optimizer_policy`` a list; or a :class:`~fm_optuna.study._spec.SpaceSection`.
        study_name: The study to create or resume.
        config: Everything not searched (default: ``ForkMergeConfig()``).
        device: With a factory, where every trial trains: one device, or with
            ``config.parallel_branches`` one per branch (``"cuda:0,cuda:1"``), as in
            :func:`train_forkmerge`.
        storage: Optuna storage URL (SQLite, PostgreSQL, or grpc://host:port for a storage
            proxy; several workers may share it).
        n_trials: Finished (complete or pruned) trials to reach.
        sampler: An Optuna sampler (default: ``TPESampler(seed=seed)``).
        pruner: An Optuna pruner (default: a median pruner aligned on training steps).
        seed: Seed of the default sampler and of every trial (default: ``config.seed``).
        tracking_uri: MLflow store (default ``MLFLOW_TRACKING_URI``; neither: no tracking);
            experiment ``fm-optuna/study/<study name>``, one parent run per study.
        checkpoint_dir: Where trials checkpoint every merge and save their final model.
        callbacks: Optuna callbacks run after each trial.
        threads: Intra-op CPU threads (``None``: torch's own setting), as ``--threads``.
        allow_config_change: Continue a study that was trained with a different configuration
            (problem, ``config``, ``space``, seed) as a new configuration version; its trials
            from now on carry the user attribute ``config_version``. Without it such a call is
            refused before anything is trained or written.

    Returns:
        :class:`~fm_optuna.study.TuneReport`: best parameters and value, the best trial's test
        metrics from its saved model, every trial's state.

    Example:
        >>> from examples.diabetes import build
        >>> report = tune(build(target="progression"), {"dt": {"low": 10, "high": 40}},
        ...               study_name="doc", storage="sqlite:///doc.db", n_trials=2,
        ...               config=ForkMergeConfig(dt=20, total_steps=40))  # doctest: +SKIP
        >>> report.best_params  # doctest: +SKIP
        {'dt': 31}
    """
    from fm_optuna.study._tuner import Tuner

    config = config or ForkMergeConfig()
    if not isinstance(study_name, str) or not study_name.strip():
        raise invalid("study_name", study_name, "a non-empty name")
    problem, replicas = _on_devices(problem, device, config)
    where = f"fm_optuna.tune({study_name!r})"
    if not isinstance(space, SpaceSection):
        space = parse_space(space, steps=config.total_steps, where=where)
    spec = StudySpec(
        path=where,  # messages name the call instead of a file
        study=StudyOptions(
            name=study_name,
            n_trials=n_trials,
            storage=storage,
            tracking_uri=tracking_uri,
            checkpoint_dir=checkpoint_dir,
        ),
        problem=ProblemSection(benchmark=problem.name, target=problem.target),
        base=config if seed is None else dataclasses.replace(config, seed=seed),
        space=space,
        runtime=RuntimeOptions(device=device, threads=threads),
    )
    check_branches_fit(spec, problem)
    _use_threads(threads)
    tracking = None
    uri = _tracking_uri(tracking_uri)
    if uri is not None:
        from fm_optuna.tracking import study_tracking

        tracking = study_tracking(uri, study_name)
    tuner = Tuner(
        spec,
        problem=problem,
        replicas=replicas,
        sampler=sampler,
        pruner=pruner,
        tracking=tracking,
        device=problem.device,
        allow_config_change=allow_config_change,
    )
    return tuner.run(callbacks=callbacks)


def search_merge(
    evaluate: Callable[[np.ndarray], float],
    n_branches: int,
    *,
    strategy: str | MergeStrategy = ForkMergeConfig.strategy,
    budget: int = ForkMergeConfig.merge_trials,
    seed: int = 0,
    grid_resolution: float = ForkMergeConfig.grid_resolution,
    branch_scores: Sequence[float] | None = None,
    warm_start: Sequence[float] | None = None,
) -> MergeDecision:
    """Find Λ on the simplex maximising ``evaluate(Λ)``, e.g. for checkpoints you already have.

    Args:
        evaluate: Score of the merge with weights Λ (an array of ``n_branches`` summing to 1);
            higher is better; NaN or infinite scores are never chosen.
        n_branches: How many models are merged.
        strategy: A name of ``fm_optuna.search.STRATEGIES`` (``tpe``, the default of every
            door, ``grid``, ``binary``, ``greedy`` (the paper's Algorithm 3), ``cmaes``,
            ``random``, ``gp``, ``gradient``) or a :class:`~fm_optuna.search.MergeStrategy`.
        budget: Evaluations for the strategies that take a budget.
        seed: Seed of the inner study.
        grid_resolution: Lattice step of ``grid``.
        branch_scores: Each model's own score (default: evaluated at the vertices).
        warm_start: A Λ to try first (e.g. the previous decision).

    Returns:
        :class:`~fm_optuna.search.MergeDecision`: ``weights`` (Λ), ``score``, every trial.

    Example:
        >>> decision = search_merge(lambda lam: -abs(lam[0] - 0.3), 2, strategy="grid")
        >>> [round(w, 1) for w in decision.weights]
        [0.3, 0.7]
    """
    if not isinstance(n_branches, int) or n_branches < 1:
        raise invalid("n_branches", n_branches, "a positive integer")
    if isinstance(strategy, str):
        strategy = make_strategy(strategy, resolution=grid_resolution)
    if branch_scores is None:
        branch_scores = [float(evaluate(row)) for row in np.eye(n_branches)]
    elif len(branch_scores) != n_branches:
        raise invalid("branch_scores", list(branch_scores), f"{n_branches} scores")
    return _search_merge(
        evaluate,
        strategy=strategy,
        n_branches=n_branches,
        budget=budget,
        seed=seed,
        branch_scores=branch_scores,
        warm_start=warm_start,
    )


__all__ = ["ConfigError", "compare_methods", "search_merge", "train_forkmerge", "tune"]
