"""The event stream: frozen event records and the :class:`Observer` that receives them.

The ForkMerge loop and the baselines only *emit* events. Tracking (MLflow), progress bars,
outer-trial pruning reports and checkpoints are observers; none of them is known to the loop.
Each event names the observer hook that receives it, so adding an event never touches the loop.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from fm_optuna.errors import one_of

if TYPE_CHECKING:
    from fm_optuna.search._base import MergeDecision


@dataclass(frozen=True)
class Event:
    hook: ClassVar[str] = "on_event"


@dataclass(frozen=True)
class RunStarted(Event):
    """A training run (ForkMerge or a baseline) begins."""

    hook: ClassVar[str] = "on_run_started"
    run: str  # "forkmerge", "stl", "ew", ...
    params: Mapping[str, Any]  # the whole flat configuration, loggable as is
    branches: Mapping[str, Mapping[str, float]]  # branch name -> task-weighting vector
    total_steps: int
    resumed_at_step: int = 0  # > 0 when the run continues from a checkpoint
    # (step, decision) of every merge before the resume, rounds 1.. in order: observers that
    # start afresh (a new MLflow run) restore the whole Λ trajectory from these.
    resumed_merges: tuple[tuple[int, MergeDecision], ...] = ()


@dataclass(frozen=True)
class TrainingProgress(Event):
    """Mean per-task training losses of one branch over the last few steps, and what the update
    rule reports about the same window (``metrics``: flat, slash-namespaced keys, e.g. IT-MTL's
    ``candidate/pcgrad/chosen``, the share of the window's steps that applied that candidate)."""

    hook: ClassVar[str] = "on_training_progress"
    run: str
    branch: str
    step: int  # global training step reached by this branch
    losses: Mapping[str, float]
    metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class BranchDiverged(Event):
    """A branch's training loss became NaN/inf in this round; it sits out the merge (Λ = 0)
    and restarts from θ* with a fresh optimizer state. When every branch diverges the run
    raises :class:`~fm_optuna.errors.NonFiniteTraining` instead."""

    hook: ClassVar[str] = "on_branch_diverged"
    run: str
    round: int
    branch: str
    step: int  # global step of the first non-finite loss
    task: str
    message: str


@dataclass(frozen=True)
class BranchesEvaluated(Event):
    """Every branch of a round has been trained Δt steps and scored on the target validation set."""

    hook: ClassVar[str] = "on_branches_evaluated"
    run: str
    round: int
    step: int
    scores: Mapping[str, float]  # branch -> target validation score (higher is better)
    metrics: Mapping[str, Mapping[str, float]]  # branch -> target validation metrics


@dataclass(frozen=True)
class MergeCompleted(Event):
    """A merge decision has been applied: θ* = Σ Λ_b θ_b is the new shared model."""

    hook: ClassVar[str] = "on_merge_completed"
    run: str
    round: int
    step: int
    branches: tuple[str, ...]
    decision: MergeDecision
    merged_metrics: Mapping[str, float]  # target validation metrics of θ*
    best_branch_score: float
    # Full resumable state of the run at this merge, built only if an observer asks for it.
    snapshot: Callable[[], dict[str, Any]] | None = field(default=None, compare=False, repr=False)
    # What the merge search saw, as data (fm_optuna.search._merge_problem), built only if asked for.
    merge_problem: Callable[[], dict[str, Any]] | None = field(
        default=None, compare=False, repr=False
    )

    @property
    def gain(self) -> float:
        """Merged score minus the best single branch's (≥ 0 whenever a one-hot Λ was tried)."""
        return self.decision.score - self.best_branch_score


#: How a run can end: ``COMPLETE``, ``PRUNED`` (an observer stopped it, e.g. the outer study's
#: pruner, by raising :class:`RunPruned`) or ``FAIL`` (training or its evaluation raised).
RUN_STATUSES = ("COMPLETE", "PRUNED", "FAIL")


@dataclass(frozen=True)
class RunSummary:
    """How one run (ForkMerge or a baseline) ended: the final model's metrics, time and status.

    Built where the run is, never by its callers: the ForkMerge loop and the baseline runner
    evaluate their final model on ``val`` and ``test`` for every task of the problem they trained
    and emit :class:`RunFinished` with it. Every door therefore logs the same ``final/*`` keys
    (see ``tracking/README.md``). A PRUNED or FAIL run has no metrics.
    """

    status: str = "COMPLETE"
    seconds: float = 0.0  # the run's wall time: final evaluation and time before a resume included
    target: str = ""
    target_metric: str = ""  # the target's primary metric
    val: Mapping[str, Mapping[str, float]] = field(default_factory=dict)  # task -> metric -> value
    test: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    fail_reason: str | None = None  # ``"NonFiniteTraining: training loss became nan (...)"``

    def __post_init__(self) -> None:
        if self.status not in RUN_STATUSES:
            raise one_of("status", self.status, RUN_STATUSES)

    @property
    def target_val(self) -> float | None:
        """The target's primary metric on the validation split (``None`` unless COMPLETE)."""
        return self.val.get(self.target, {}).get(self.target_metric)

    @property
    def target_test(self) -> float | None:
        """The target's primary metric on the test split (``None`` unless COMPLETE)."""
        return self.test.get(self.target, {}).get(self.target_metric)


class RunPruned(Exception):
    """Raised by an observer's hook to stop the run early: the run ends PRUNED, not FAIL.

    The outer study's pruning reporter raises an exception that is both this and Optuna's
    ``TrialPruned``, so the core needs no Optuna.
    """


@dataclass(frozen=True)
class RunFinished(Event):
    """A run ended; emitted once by the code that started it (see :class:`RunSummary`)."""

    hook: ClassVar[str] = "on_run_finished"
    run: str
    summary: RunSummary

    @property
    def status(self) -> str:
        return self.summary.status

    @property
    def seconds(self) -> float:
        return self.summary.seconds


@dataclass(frozen=True)
class TransferMeasured(Event):
    """A finished run compared with single-task learning (``run_methods`` after each method):
    TG of the target and of every task its model serves, Δm's terms and Δm (see
    :mod:`fm_optuna.experiments._run_methods` for the definitions)."""

    hook: ClassVar[str] = "on_transfer_measured"
    run: str
    tg: float | None  # the target's TG, in its metric's units, + is better
    delta_m: float | None  # a fraction (× 100 for %)
    tg_tasks: Mapping[str, float] = field(default_factory=dict)
    relative: Mapping[str, float] = field(default_factory=dict)


class Observer:
    """Receives events; every hook is a no-op so an observer overrides only what it needs.

    Lifecycle for one run: ``on_run_started`` → (``on_training_progress``* →
    ``on_branch_diverged``* → ``on_branches_evaluated`` → ``on_merge_completed``)* →
    ``on_run_finished`` (→ ``on_transfer_measured`` when compared with STL). Baseline runs emit
    no branch or merge events. A hook may raise :class:`RunPruned` to stop the run.
    """

    def on_run_started(self, event: RunStarted) -> None: ...

    def on_training_progress(self, event: TrainingProgress) -> None: ...

    def on_branch_diverged(self, event: BranchDiverged) -> None: ...

    def on_branches_evaluated(self, event: BranchesEvaluated) -> None: ...

    def on_merge_completed(self, event: MergeCompleted) -> None: ...

    def on_run_finished(self, event: RunFinished) -> None: ...

    def on_transfer_measured(self, event: TransferMeasured) -> None: ...

    def close(self) -> None:
        """Called once when the whole command ends (flush, print what was not logged, ...)."""


class EventStream:
    """Fans each event out to the observers, in order."""

    def __init__(self, observers: Iterable[Observer] = ()) -> None:
        self.observers: list[Observer] = list(observers)

    def emit(self, event: Event) -> None:
        for observer in self.observers:
            getattr(observer, event.hook)(event)

    @property
    def wants_snapshots(self) -> bool:
        return any(getattr(observer, "wants_snapshots", False) for observer in self.observers)

    def close(self) -> None:
        for observer in self.observers:
            observer.close()
