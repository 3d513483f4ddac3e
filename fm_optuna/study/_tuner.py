"""The outer Optuna study: each trial picks Δt, L (and optionally lr, optimizer policy), trains
ForkMerge with the inner merge search, reports the target's validation metric after every merge
(so the pruner can stop it) and returns the final one.

The study's direction follows the target's metric (``minimize`` an MAE, ``maximize`` an
accuracy) and its metric name is set, so dashboards show the metric itself. A trial whose
training goes non-finite (or fails otherwise) ends FAIL with the reason in the user attribute
``fail_reason``, and counts towards the requested number of trials.

Studies are resumable (same name and storage: finished trials are kept, a new invocation adds
trials up to the requested total) and shareable by many workers on an RDB storage; heartbeats
mark a dead worker's trial FAIL, it is re-enqueued with the same parameters, and the retry
resumes from the dead trial's last merge checkpoint (on any devices of the kind that wrote it;
a retry on another kind, CPU for CUDA, starts the trial afresh).

A study records what its trials train with (:mod:`fm_optuna.study._fingerprint`): an
invocation whose spec changes it is refused before it trains or writes anything, unless it
continues on purpose (``allow_config_change``), and every trial carries its configuration
version (user attribute ``config_version``).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import optuna
import torch
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.pruners import BasePruner
from optuna.storages import BaseStorage, RetryHeartbeatStaleTrialCallback
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from fm_optuna.config import ForkMergeConfig
from fm_optuna.core._checkpoints import (
    Checkpointer,
    load_checkpoint,
    probe_writable,
    save_checkpoint,
)
from fm_optuna.core._devices import device_kind
from fm_optuna.core._ending import fail_reason
from fm_optuna.core._events import EventStream, MergeCompleted, Observer, RunPruned
from fm_optuna.core._loop import ForkMergeResult, run_forkmerge
from fm_optuna.errors import ConfigError, FmOptunaError, Interrupted, NonFiniteTraining, WriteFailed
from fm_optuna.problem._checks import check_problem
from fm_optuna.problem._tasks import Problem
from fm_optuna.search._merge_problem import MergeProblemWriter, artifact_logger
from fm_optuna.search._search import quiet_optuna
from fm_optuna.study._dashboard import DashboardNotes
from fm_optuna.study._fingerprint import (
    TRIAL_FINGERPRINT_ATTR,
    TRIAL_VERSION_ATTR,
    Settlement,
    Version,
    configuration_record,
    fingerprint,
    refusal,
    settle,
)
from fm_optuna.study._grpc import GrpcStorage, check_grpc, is_grpc
from fm_optuna.study._processes import this_worker
from fm_optuna.study._sampler import DistinctSampler
from fm_optuna.study._shared_baselines import SharedBaselines
from fm_optuna.study._spec import StudySpec, check_branches_fit, check_space_searches
from fm_optuna.study._stale import FAIL_REASON, STALE, ReasonedRDBStorage, without_reason
from fm_optuna.study._storages import (
    check_database,
    named_connections,
    one_process_at_a_time,
    sqlite_file,
)
from fm_optuna.tracking.uris import mask_uri, redact

logger = logging.getLogger(__name__)

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


class Overtaken(FmOptunaError):
    """Another worker failed, on its heartbeat, the trial this one was training."""


#: The ``application_name`` of a worker's own PostgreSQL connections (``pg_stat_activity``).
WORKER_APPLICATION = "fm-optuna"
#: User attribute of a FAIL trial that is retried (with its parameters, from its checkpoint) by
#: the next invocation: interrupted by a signal, or stopped by a write the system refused.
RETRYABLE = "retryable"


def _devices(device: torch.device | Sequence[torch.device] | None) -> list[torch.device]:
    """The devices a spec's problem is built on (default: CUDA when there is one, else CPU)."""
    if device is None:
        return [torch.device("cuda" if torch.cuda.is_available() else "cpu")]
    return [device] if isinstance(device, torch.device) else list(device)


def finished_trials(study: optuna.Study) -> list[FrozenTrial]:
    """Trials that count towards the study's total: COMPLETE, PRUNED, and FAIL with a reason
    (training went non-finite, an error) — not a dead worker's FAIL nor an interrupted one,
    which are retried."""
    return [
        trial
        for trial in study.get_trials(deepcopy=False)
        if trial.state in FINISHED
        or (
            trial.state == TrialState.FAIL
            and FAIL_REASON in trial.user_attrs
            and not trial.user_attrs.get(RETRYABLE)
            and not trial.user_attrs.get(STALE)
        )
    ]


def target_metric_name(problem: Problem) -> str:
    """The outer study's metric name: ``target_val/<primary metric>``."""
    return f"target_val/{problem.task(problem.target).metric}"


class StudyObserver(Protocol):
    """What the outer study needs from experiment tracking (see fm_optuna.tracking.study_run)."""

    def observers(self, trial: optuna.Trial, config: ForkMergeConfig) -> Sequence[Observer]: ...

    def mark_dead(self, study: optuna.Study, trial: FrozenTrial) -> None: ...

    def start(self, study: optuna.Study) -> None: ...

    def finish(self, study: optuna.Study, *, status: str = "FINISHED") -> None: ...

    def log_baselines(self, study: optuna.Study) -> None: ...

    def browse(self) -> list[str]: ...


def mask_password(url: str) -> str:
    """``postgresql://user:secret@host/db`` → ``postgresql://user:***@host/db`` (and every
    other form of secret :func:`~fm_optuna.tracking.uris.mask_uri` knows)."""
    return mask_uri(url)


class MedianPruner(BasePruner):
    """Prune a trial whose latest value is worse than the median of the other trials at that
    step ("worse" in the study's direction).

    Optuna's MedianPruner compares values reported at the *same* step; trials with different Δt
    merge at different steps, so here each other trial contributes its last value reported at
    or before the step (training progress, not round number, is what is comparable). Unlike
    Optuna's, running trials of other workers that are past the step count too.
    """

    def __init__(self, *, n_startup_trials: int = 2, n_warmup_steps: int = 0) -> None:
        self.n_startup_trials = n_startup_trials
        self.n_warmup_steps = n_warmup_steps

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        if not trial.intermediate_values:
            return False
        step = max(trial.intermediate_values)
        if step < self.n_warmup_steps:
            return False
        value = trial.intermediate_values[step]
        if math.isnan(value):
            return True
        # Compared as higher-is-better: a minimised metric is negated on both sides.
        sign = -1.0 if study.direction == StudyDirection.MINIMIZE else 1.0
        value *= sign
        others = [sign * other for other in _values_at(study, trial, step)]
        if len(others) < self.n_startup_trials:
            return False
        others.sort()
        middle = len(others) // 2
        median = others[middle] if len(others) % 2 else (others[middle - 1] + others[middle]) / 2
        return value < median


def _values_at(study: optuna.Study, trial: FrozenTrial, step: int) -> Iterator[float]:
    """Each other trial's last value reported at or before ``step``: finished trials', and those
    of running trials already past ``step`` (workers sharing a study prune with what the others
    have measured so far, as one worker would after they finished; a running trial not yet at
    ``step`` is left out, its last value being one of less training)."""
    states = (*FINISHED, TrialState.RUNNING)
    for other in study.get_trials(deepcopy=False, states=states):
        if other.state == TrialState.RUNNING and (
            other.number == trial.number or max(other.intermediate_values, default=-1) < step
        ):
            continue
        earlier = [s for s in other.intermediate_values if s <= step]
        if earlier:
            yield other.intermediate_values[max(earlier)]


class TrialPruned(optuna.TrialPruned, RunPruned):
    """Optuna's signal to prune the trial, which also ends its ForkMerge run PRUNED."""


class PruningReporter(Observer):
    """Reports each merge's target validation metric to the outer trial and prunes if told to.

    The merge search keeps higher-is-better scores; the report is the metric itself, in the
    study's direction (``higher_is_better=False``: the score's negation).
    """

    def __init__(
        self,
        trial: optuna.Trial,
        *,
        higher_is_better: bool = True,
        total_steps: int | None = None,
    ) -> None:
        self.trial = trial
        self.sign = 1.0 if higher_is_better else -1.0
        self.total_steps = total_steps

    def on_merge_completed(self, event: MergeCompleted) -> None:
        self.trial.report(self.sign * event.decision.score, step=event.step)
        # A trial that trained all T steps is COMPLETE: pruning it now saves nothing.
        if self.total_steps is not None and event.step >= self.total_steps:
            return
        if self.trial.should_prune():
            raise TrialPruned(f"pruned at step {event.step} (round {event.round})")


@contextlib.contextmanager
def _no_experimental_warnings() -> Iterator[None]:
    """Heartbeats and their retry callback are marked experimental; they are what we rely on."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


def open_storage(
    url: str,
    *,
    heartbeat_seconds: int,
    max_retry: int,
    on_stale: Callable[[optuna.Study, FrozenTrial], None] | None = None,
) -> BaseStorage:
    """An RDB storage (or, for ``grpc://host:port``, a gRPC storage proxy's client) with
    heartbeats; an unreachable database is one clear ConfigError."""
    with _no_experimental_warnings():
        return _open_storage(url, heartbeat_seconds, max_retry, on_stale)


def _open_storage(
    url: str,
    heartbeat_seconds: int,
    max_retry: int,
    on_stale: Callable[[optuna.Study, FrozenTrial], None] | None,
) -> BaseStorage:
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    # Intermediate values carry over: the retry resumes after the dead trial's last merge.
    retry = RetryHeartbeatStaleTrialCallback(max_retry=max_retry, inherit_intermediate_values=True)

    def stale(study: optuna.Study, trial: FrozenTrial) -> None:
        retry(study, without_reason(trial))
        if on_stale is not None:
            on_stale(study, trial)

    if is_grpc(url):
        check_grpc(url)
        return GrpcStorage(
            url,
            heartbeat_interval=heartbeat_seconds,
            grace_period=2 * heartbeat_seconds,
            failed_trial_callback=stale,
        )
    try:
        with one_process_at_a_time(url):  # workers creating one SQLite file together
            return ReasonedRDBStorage(
                url,
                heartbeat_interval=heartbeat_seconds,
                grace_period=2 * heartbeat_seconds,
                heartbeat_stale_trial_callback=stale,
                engine_kwargs=None
                if url.startswith("sqlite")
                else {"pool_pre_ping": True, **named_connections(url, WORKER_APPLICATION)},
            )
    except Exception as error:  # sqlalchemy raises many kinds; the user needs one line
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(
            f"Parameter `storage` should be a reachable Optuna storage URL. "
            f"Found `storage = {mask_uri(url)}` ({redact(first, url)})."
        ) from None


def _suggest(trial: optuna.Trial, name: str, distribution: BaseDistribution) -> Any:
    if isinstance(distribution, IntDistribution):
        return trial.suggest_int(name, distribution.low, distribution.high, log=distribution.log)
    if isinstance(distribution, FloatDistribution):
        return trial.suggest_float(name, distribution.low, distribution.high, log=distribution.log)
    assert isinstance(distribution, CategoricalDistribution)
    return trial.suggest_categorical(name, list(distribution.choices))


def root_trial_number(trial: FrozenTrial | optuna.Trial) -> int:
    """The first trial of a chain of retries (its checkpoint is shared by the chain)."""
    frozen = (
        trial if isinstance(trial, FrozenTrial) else trial.study._storage.get_trial(trial._trial_id)
    )
    history = RetryHeartbeatStaleTrialCallback.retry_history(frozen)
    return history[0] if history else frozen.number


def _failed(trial: optuna.Trial, error: BaseException, *, retryable: bool = False) -> None:
    """Keep why the trial failed (user attribute ``fail_reason``, the reason its run, ended
    FAILED by the loop, is tagged with); a ``retryable`` one is retried by the next invocation."""
    reason = error.line() if isinstance(error, Interrupted) else fail_reason(error)
    trial.set_user_attr(FAIL_REASON, mask_uri(reason))
    if retryable:
        trial.set_user_attr(RETRYABLE, True)


class _OwnFailuresQuiet(logging.Filter):
    """Drops Optuna's "Trial 3 failed ... because of the following error" (a 30-line traceback)
    for failures fm-optuna reports itself in one line: an interrupt, a refused write, ours."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not isinstance(error, KeyboardInterrupt | FmOptunaError)


@contextlib.contextmanager
def _quiet_own_failures() -> Iterator[None]:
    optimize_logger = logging.getLogger("optuna.study._optimize")
    quiet = _OwnFailuresQuiet()
    optimize_logger.addFilter(quiet)
    try:
        yield
    finally:
        optimize_logger.removeFilter(quiet)


def lambda_table(result: ForkMergeResult) -> list[dict[str, float]]:
    """Λ per merge keyed by branch name, as optuna-dashboard shows a trial's user attribute:
    ``[{"step": 100, "target": 0.6, "target+top2": 0.4, "all": 0.0}, ...]``."""
    names = [branch.name for branch in result.branches]
    return [
        {"step": step, **{name: round(w, 4) for name, w in zip(names, weights, strict=True)}}
        for step, weights in zip(result.steps, result.lambda_history, strict=True)
    ]


@dataclass
class TrialOutcome:
    number: int
    params: dict[str, Any]
    value: float | None
    state: str
    reason: str | None = None  # why a FAIL trial failed


@dataclass
class TuneReport:
    study_name: str
    storage: str
    n_trials: int
    best_params: dict[str, Any] | None
    best_value: float | None
    best_trial: int | None
    best_test: dict[str, float] | None
    best_model: str | None
    trials: list[TrialOutcome]
    tracking: dict[str, Any]
    target_metric: str = ""
    # Baseline → {"val", "test", "seconds"}: the spec's baselines trained with the best trial's
    # budget (same T, learning rate and seed), for the comparison the summary ends with.
    baselines: dict[str, dict[str, float]] = field(default_factory=dict)


class Tuner:
    """Runs (or resumes) the outer study described by a spec."""

    def __init__(
        self,
        spec: StudySpec,
        *,
        storage: str | None = None,
        n_trials: int | None = None,
        observers: Callable[[optuna.Trial, ForkMergeConfig], Sequence[Observer]] | None = None,
        on_stale: Callable[[optuna.Study, FrozenTrial], None] | None = None,
        device: torch.device | Sequence[torch.device] | None = None,
        problem: Problem | None = None,
        replicas: Sequence[Problem] = (),
        tracking: Callable[[Problem], StudyObserver] | None = None,
        config: ForkMergeConfig | None = None,
        sampler: optuna.samplers.BaseSampler | None = None,
        pruner: BasePruner | None = None,
        allow_config_change: bool = False,
    ) -> None:
        """``device`` is where the spec's ``[problem]`` is built: one device, or one per branch
        (``parallel_branches`` with several; the problem built once on each, see
        :mod:`fm_optuna.core._devices`). ``problem`` (checked here) replaces the spec's
        ``[problem]``, and ``replicas`` are the same problem on further devices; ``config`` is
        the base configuration each trial's suggestions override (default: the spec's);
        ``sampler`` and
        ``pruner`` objects replace the spec's named ones. A study recorded with a different
        configuration is refused here (a ConfigError, nothing written to either store) unless
        ``allow_config_change``, which continues it under a new configuration version."""
        self.spec = spec
        self.storage_url = storage or spec.study.storage
        self.n_trials = n_trials or spec.study.n_trials
        check_space_searches(spec, self.n_trials)
        self.observers = observers
        self.base_config = config or spec.config()
        self.sampler, self.pruner = sampler, pruner
        if problem is None:
            problem, *replicas = [spec.build_problem(device=d) for d in _devices(device)]
        else:
            for given in (problem, *replicas):
                check_problem(given)
        self.problem, self.replicas = problem, tuple(replicas)
        self.device = torch.device(problem.device)
        check_branches_fit(spec, self.problem)
        self.record = configuration_record(spec, self.base_config, target=self.problem.target)
        self.allow_config_change = allow_config_change
        self.version: Version | None = None  # the configuration version this run's trials get
        self.checkpoints = Path(spec.study.checkpoint_dir) / spec.study.name
        # Every place this study writes is checked before anything is written in any of them.
        probe_writable(self.checkpoints, parameter="study.checkpoint_dir")
        # Both stores are checked before either is created: a mistake in one creates nothing.
        check_database(self.storage_url, parameter="storage", what="a reachable Optuna storage URL")
        self.tracking: StudyObserver | None = None

        def opened() -> BaseStorage:
            return open_storage(
                self.storage_url,
                heartbeat_seconds=spec.study.heartbeat_seconds,
                max_retry=spec.study.max_retry,
                on_stale=self._on_stale(on_stale),
            )

        # A study can only exist in a store that does: one that does is read first, so a
        # changed configuration is refused before the tracking store is opened (no experiment,
        # no run). A new SQLite file is created only after both checks.
        path = sqlite_file(self.storage_url)
        storage = opened() if path is None or path.exists() else None
        if storage is not None:
            self._check_configuration(storage)
        self.tracking = tracking(self.problem) if tracking is not None else None
        self.storage = storage or opened()
        #: The trials this invocation ran, as they ended (see :meth:`run`).
        self.ran: list[FrozenTrial] = []
        #: The trial an interrupt stopped and the merge its retry resumes after.
        self.interrupted: tuple[int, int] | None = None
        # The trial another worker failed while this one trained it, and the line saying so.
        self.overtaken: int | None = None
        self.overtaken_line: str | None = None

    def _settle(self, storage: optuna.storages.BaseStorage, study_id: int) -> Settlement:
        settlement = settle(
            storage.get_study_user_attrs(study_id),
            self.record,
            allow_change=self.allow_config_change,
            n_trials=len(storage.get_all_trials(study_id, deepcopy=False)),
        )
        if settlement.refused:
            # spec.path names a study file (the command line) or the call that built the spec.
            override = (
                "--allow-config-change"
                if isinstance(self.spec.path, Path)
                else "allow_config_change=True"
            )
            raise refusal(self.spec.path, self.spec.study.name, settlement, override=override)
        return settlement

    def _check_configuration(self, storage: optuna.storages.BaseStorage) -> None:
        """Refuse an existing study recorded with a different configuration; write nothing."""
        try:
            study_id = storage.get_study_id_from_name(self.spec.study.name)
        except KeyError:
            return  # a new study: recorded when created
        self._settle(storage, study_id)

    def _record_configuration(self, study: optuna.Study) -> Version:
        """Record this invocation's configuration on the study (a first or a new version) and
        return the version its trials belong to."""
        storage, study_id = study._storage, study._study_id
        # Workers creating one SQLite study together: one records, the others then compare.
        with one_process_at_a_time(self.storage_url):
            settlement = self._settle(storage, study_id)
            for key, value in settlement.write.items():
                try:
                    storage.set_study_user_attr(study_id, key, value)
                except Exception:  # a server database: another worker inserted it first
                    if storage.get_study_user_attrs(study_id).get(key) != value:
                        raise
        if settlement.write and settlement.changes:
            logger.warning(
                "study `%s` continues with configuration version %d (%s): its trials from now "
                "on are tagged %s = %d",
                study.study_name,
                settlement.version.number,
                ", ".join(settlement.changes),
                TRIAL_VERSION_ATTR,
                settlement.version.number,
            )
        return settlement.version

    def _on_stale(
        self, on_stale: Callable[[optuna.Study, FrozenTrial], None] | None
    ) -> Callable[[optuna.Study, FrozenTrial], None]:
        def stale(study: optuna.Study, trial: FrozenTrial) -> None:
            if self.tracking is not None:
                self.tracking.mark_dead(study, trial)
            if on_stale is not None:
                on_stale(study, trial)

        return stale

    def _named_sampler(self) -> optuna.samplers.BaseSampler:
        s = self.spec.study
        startup = min(4, self.n_trials)

        def make(seed: int) -> optuna.samplers.BaseSampler:
            if s.sampler == "tpe":
                # constant_liar: a worker's proposal accounts for other workers' running trials.
                return optuna.samplers.TPESampler(
                    seed=seed, n_startup_trials=startup, constant_liar=True
                )
            return optuna.samplers.RandomSampler(seed=seed)

        # Seeded per trial number and never repeating another trial: see fm_optuna.study._sampler.
        return DistinctSampler(make, seed=self.spec.seed, space=self.search_space())

    def create_study(self) -> optuna.Study:
        sampler = self.sampler or self._named_sampler()
        pruner = self.pruner or (
            MedianPruner() if self.spec.study.pruner == "median" else optuna.pruners.NopPruner()
        )
        s = self.spec.study
        direction = "maximize" if self.higher_is_better else "minimize"
        study = optuna.create_study(
            study_name=s.name,
            storage=self.storage,
            sampler=sampler,
            pruner=pruner,
            direction=direction,
            load_if_exists=True,
        )
        if study.direction.name.lower() != direction:
            raise ConfigError(
                f"Parameter `study.name` should name a study that {direction}s "
                f"{target_metric_name(self.problem)}. Found `study.name = {s.name}`, a study in "
                f"{mask_uri(self.storage_url)} that {study.direction.name.lower()}s (made "
                "before the direction followed the metric?): choose a new study name."
            )
        self.version = self._record_configuration(study)
        names = [target_metric_name(self.problem)]
        if study.metric_names != names:
            try:
                study.set_metric_names(names)
            except Exception:  # workers starting together race to insert the same attribute
                if study.metric_names != names:
                    raise
        return study

    @property
    def higher_is_better(self) -> bool:
        return self.problem.task(self.problem.target).higher_is_better

    def search_space(self) -> dict[str, BaseDistribution]:
        """The outer study's parameters and their distributions, as :meth:`suggest` uses them."""
        space: dict[str, BaseDistribution] = {}
        spec = self.spec.space
        if spec.dt is not None:
            space["dt"] = IntDistribution(spec.dt.low, spec.dt.high, log=spec.dt.log)
        if spec.branches is not None:
            space["branches"] = IntDistribution(spec.branches.low, spec.branches.high)
        if spec.lr is not None:
            space["lr"] = FloatDistribution(spec.lr.low, spec.lr.high, log=spec.lr.log)
        if spec.optimizer_policy is not None:
            space["optimizer_policy"] = CategoricalDistribution(list(spec.optimizer_policy))
        return space

    def suggest(self, trial: optuna.Trial) -> ForkMergeConfig:
        fixed = {name: _suggest(trial, name, d) for name, d in self.search_space().items()}
        return dataclasses.replace(self.base_config, **fixed)

    def checkpoint_path(self, root: int) -> Path:
        return self.checkpoints / f"trial_{root}.ckpt"

    def model_path(self, number: int) -> Path:
        return self.checkpoints / f"trial_{number}_final.pt"

    @property
    def artifact_dir(self) -> Path:
        """The study's Optuna artifact store (``optuna-dashboard … --artifact-dir`` this)."""
        return (self.checkpoints / "artifacts").resolve()

    def _dashboard_notes(self, trial: optuna.Trial) -> DashboardNotes:
        return DashboardNotes(
            trial,
            self.artifact_dir,
            metric=target_metric_name(self.problem),
            higher_is_better=self.higher_is_better,
            run_link=getattr(self.tracking, "run_link", None),
        )

    def merge_problems(self, number: int) -> Path:
        """Where trial ``number`` saves its merge problems (``search.save_merge_problems``)."""
        return self.checkpoints / "merge_problems" / f"trial_{number}"

    def _merge_problem_writer(
        self, trial: optuna.Trial, observers: Sequence[Observer]
    ) -> MergeProblemWriter:
        """Saves every merge of this trial's run, logged to its MLflow run when tracked."""
        source = {
            "benchmark": self.spec.problem.benchmark,
            "target": self.problem.target,
            "seed": self.spec.seed,
            "options": dict(self.spec.problem.options),
        }
        folder = self.merge_problems(trial.number)
        return MergeProblemWriter(folder, source, on_saved=artifact_logger(observers))

    def objective(self, trial: optuna.Trial) -> float:
        try:
            return self._train(trial)
        except optuna.exceptions.UpdateFinishedTrialError:
            raise self._overtaken_by_another(trial) from None

    def _overtaken_by_another(self, trial: optuna.Trial) -> BaseException:
        """The error of a trial this worker trains that another worker failed meanwhile (its
        heartbeats came too late: a stalled machine, a slow storage): one line, not Optuna's
        traceback, and :meth:`run` goes on with the next trial."""
        frozen = trial.study._storage.get_trial(trial._trial_id)
        if frozen.state != TrialState.FAIL:
            return optuna.exceptions.UpdateFinishedTrialError(f"trial {trial.number} finished")
        reason = frozen.user_attrs.get(FAIL_REASON, "no reason recorded")
        self.overtaken = trial.number
        self.overtaken_line = (
            f"trial {trial.number} was failed by another worker while this one trained it "
            f"({reason}); it is retried from its last merge checkpoint, and this worker goes on "
            "with the next trial"
        )
        return Overtaken(self.overtaken_line)

    def _train(self, trial: optuna.Trial) -> float:
        config = self.suggest(trial)
        root = root_trial_number(trial)
        checkpoint_path = self.checkpoint_path(root)
        resume = load_checkpoint(checkpoint_path)
        if resume is not None and resume.get("config") != config.as_params():
            resume = None  # a different configuration under the same number: start over
        if resume is not None and device_kind(resume) not in (None, self.device.type):
            resume = None  # retried on another kind of device: its data streams cannot go on
        trial.set_user_attr("resumed_from_round", 0 if resume is None else int(resume["round"]))
        trial.set_user_attr("worker", this_worker())
        if self.version is not None:
            trial.set_user_attr(TRIAL_VERSION_ATTR, self.version.number)
            trial.set_user_attr(TRIAL_FINGERPRINT_ATTR, self.version.fingerprint)
        # Checkpoint first (a merge is never lost), then tracking, then the pruning decision.
        extra = list(self.tracking.observers(trial, config)) if self.tracking is not None else []
        if self.observers is not None:
            extra += self.observers(trial, config)
        if self.spec.search.save_merge_problems:
            extra.append(self._merge_problem_writer(trial, extra))
        extra.append(self._dashboard_notes(trial))
        reporter = PruningReporter(
            trial, higher_is_better=self.higher_is_better, total_steps=config.total_steps
        )
        checkpointer = Checkpointer(checkpoint_path)
        events = EventStream([checkpointer, *extra, reporter])
        resumed_round = 0 if resume is None else int(resume["round"])
        # The run ends itself in `events`: FINISHED, FAILED (a non-finite loss or final target
        # validation metric included) or KILLED when pruned.
        try:
            result = run_forkmerge(
                self.problem, config, events, resume_from=resume, replicas=self.replicas
            )
            target = self.problem.task(self.problem.target)  # the study's, under the joint plan too
            metrics = dict(result.summary.val[target.name])
            save_checkpoint(  # atomic: a saved final model is always a whole one
                {"state_dict": result.model.state_dict(), "config": config.as_params()},
                self.model_path(trial.number),
            )
            trial.set_user_attr("final_model", str(self.model_path(trial.number).resolve()))
            trial.set_user_attr("lambda_history", lambda_table(result))
            trial.set_user_attr("val_metrics", metrics)
            self._finished_with(checkpoint_path)
            return float(metrics[target.metric])
        except NonFiniteTraining as error:
            _failed(trial, error)
            self._finished_with(checkpoint_path)
            return math.nan  # FAIL, logged by Optuna as one line rather than a traceback
        except optuna.TrialPruned:
            self._finished_with(checkpoint_path)
            raise
        except KeyboardInterrupt as error:  # Ctrl-C or SIGTERM: retried from its checkpoint
            last = checkpointer.saved_rounds[-1] if checkpointer.saved_rounds else resumed_round
            self.interrupted = (trial.number, last)
            _failed(trial, error, retryable=True)
            raise
        except WriteFailed as error:  # a full disk: the checkpoint is intact, the trial retried
            _failed(trial, error, retryable=True)
            raise
        except optuna.exceptions.UpdateFinishedTrialError:
            raise  # failed by another worker: nothing more can be written to it
        except Exception as error:
            _failed(trial, error)
            raise
        finally:
            events.close()

    def _finished_with(self, checkpoint: Path) -> None:
        """A trial that will not be retried needs its merge checkpoint no more (its final model
        is kept): removed unless ``study.keep_checkpoints``."""
        if not self.spec.study.keep_checkpoints:
            checkpoint.unlink(missing_ok=True)

    def run(
        self, callbacks: Sequence[Callable[[optuna.Study, FrozenTrial], None]] = ()
    ) -> TuneReport:
        # The progress bar says what Optuna's per-trial INFO lines would, without the flood.
        with quiet_optuna(optuna.logging.WARNING), _quiet_own_failures():
            study = self.create_study()
            self.requeue_interrupted(study)
            if self.tracking is not None:
                self.tracking.start(study)
            status = "FAILED"
            try:
                while len(finished_trials(study)) < self.n_trials:
                    try:
                        study.optimize(
                            self.objective,
                            n_trials=None,
                            callbacks=[self._stop_at_total, self._ran, *callbacks],
                            catch=(RuntimeError, FloatingPointError),
                            gc_after_trial=False,
                        )
                        break
                    except (ValueError, optuna.exceptions.UpdateFinishedTrialError) as error:
                        # Optuna cannot tell a trial another worker failed meanwhile ("Cannot
                        # tell a FAIL trial") and leaves optimize; this worker is still sound.
                        if self.overtaken is None:
                            raise
                        logger.warning("fm-optuna: %s", self.overtaken_line or error)
                        self.overtaken = self.overtaken_line = None
                status = "FINISHED"
            except KeyboardInterrupt as error:
                status = "KILLED"
                self._interrupted(study, error)
                raise
            except WriteFailed:
                self.requeue_interrupted(study)
                raise
            finally:  # the study's MLflow run never stays RUNNING after this invocation
                if self.tracking is not None:
                    self.tracking.finish(study, status=status)
        report = self.report(study)
        if report.best_trial is not None and self.spec.study.baselines:
            report.baselines = self.baseline_scores(study, study.best_trial)
            if self.tracking is not None:
                self.tracking.log_baselines(study)
        if self.tracking is not None:
            report.tracking["browse"] = self.tracking.browse()
        return report

    def _ran(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.ran.append(trial)

    def _interrupted(self, study: optuna.Study, error: KeyboardInterrupt) -> None:
        """Queue the interrupted trial's retry now (another worker may take it) and say so."""
        self.requeue_interrupted(study)
        if not isinstance(error, Interrupted):
            return
        if self.interrupted is None:
            error.next_step = "no trial was running"
            return
        number, merge = self.interrupted
        where = f"from merge {merge}" if merge else "from the start"
        error.next_step = f"trial {number} will be retried {where} by the next `fm-optuna tune`"

    def requeue_interrupted(self, study: optuna.Study) -> list[int]:
        """Queue a retry (same parameters, same checkpoint) of every retryable FAIL trial that
        has none yet; return their numbers. Idempotent: a retried trial is not queued again."""
        trials = study.get_trials(deepcopy=False)
        retried = {
            number
            for other in trials
            for number in RetryHeartbeatStaleTrialCallback.retry_history(other)
        }
        retry = RetryHeartbeatStaleTrialCallback(
            max_retry=self.spec.study.max_retry, inherit_intermediate_values=True
        )
        queued = []
        for trial in trials:
            if (
                trial.state != TrialState.FAIL
                or not trial.user_attrs.get(RETRYABLE)
                or trial.number in retried
            ):
                continue
            template = copy.deepcopy(trial)
            # The retry is a fresh attempt: why its predecessor stopped stays with that one.
            template.user_attrs = {
                k: v for k, v in trial.user_attrs.items() if k not in (FAIL_REASON, RETRYABLE)
            }
            with _no_experimental_warnings():
                retry(study, template)
            queued.append(trial.number)
        return queued

    def _stop_at_total(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if len(finished_trials(study)) >= self.n_trials:
            study.stop()

    def report(self, study: optuna.Study) -> TuneReport:
        trials = study.get_trials(deepcopy=False)
        outcomes = [
            TrialOutcome(
                t.number, dict(t.params), t.value, t.state.name, t.user_attrs.get(FAIL_REASON)
            )
            for t in trials
        ]
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        best_params = best_value = best_number = best_test = best_model = None
        if complete:
            best = study.best_trial
            best_params, best_value, best_number = dict(best.params), best.value, best.number
            best_model = best.user_attrs.get("final_model")
            best_test = self.test_saved_model(best_model) if best_model else None
        return TuneReport(
            study.study_name,
            mask_uri(self.storage_url),
            self.n_trials,
            best_params,
            best_value,
            best_number,
            best_test,
            best_model,
            outcomes,
            {},
            self.problem.task(self.problem.target).metric,
        )

    def baseline_scores(
        self, study: optuna.Study, best: FrozenTrial
    ) -> dict[str, dict[str, float]]:
        """The spec's baselines trained with the best trial's budget; kept in the study's user
        attributes, so a resumed or shared study trains each of them once (see
        :mod:`fm_optuna.study._shared_baselines`)."""
        from fm_optuna.experiments._run_methods import run_methods

        config = self.suggest(optuna.trial.FixedTrial(best.params))  # type: ignore[arg-type]
        # Keyed by the study's configuration too: a change never reuses the old baselines.
        version = self.version
        budget = {
            "steps": config.total_steps,
            "lr": config.lr,
            "seed": config.seed,
            "config": version.fingerprint if version is not None else fingerprint(self.record),
        }

        def train(method: str) -> dict[str, float]:
            result = run_methods(self.problem, config, (method,)).results[0]
            return {"val": result.target_val, "test": result.target_test, "seconds": result.seconds}

        # A baseline costs at most one trial's training: a claim twice the longest trial's age
        # belongs to a worker that died on another host.
        longest = max(
            (t.duration.total_seconds() for t in finished_trials(study) if t.duration), default=0.0
        )
        shared = SharedBaselines(study, train, stale_after=max(600.0, 2 * longest))
        return shared.scores(self.spec.study.baselines, str(budget))

    def test_saved_model(self, path: str) -> dict[str, float] | None:
        """Test metrics of a trial's saved final model (never retrained)."""
        if not Path(path).exists():
            return None
        saved = torch.load(path, map_location=self.device, weights_only=True)
        model = self.problem.make_model().to(self.device)
        model.load_state_dict(saved["state_dict"])
        return self.problem.evaluate(model, "test", [self.problem.target])[self.problem.target]
