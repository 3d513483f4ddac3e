"""The MLflow observer: every branch, every merge decision and the Λ trajectory as MLflow runs.

Run layout in the experiment of one invocation:

- one run per method (``stl``, ``ew``, ``forkmerge``), siblings, tagged with method, seed,
  benchmark and target;
- under the ForkMerge run, one child run per branch (tag ``mlflow.parentRunId``), so MLflow's
  compare view puts the branches side by side.

A run's ``final/*`` metrics come from the typed summary its ``RunFinished`` carries
(:func:`final_metrics`), so every door logs the same keys for the same kind of run; the table
of keys is in ``tracking/README.md``.

Metrics are buffered and written with one ``log_batch`` per run at each merge (baselines: every
``flush_every`` progress reports) and at the end, never one call per step. A store failure in
the middle of a run never stops training: it is reported once, logging stops, and :meth:`close`
says what was not logged.

None of this happens on the training thread: :class:`MlflowTracker` copies each event and hands
it to one background thread (:mod:`fm_optuna.tracking.background`) that runs :class:`_RunLog`,
the code that makes the calls, strictly in order. The design is in ``tracking/README.md``.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import logging
import math
import platform
import re
import tempfile
import time
import urllib.parse
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from mlflow.entities import Metric, Param, RunTag
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NOTE
from mlflow.utils.validation import (
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VAL_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
)

from fm_optuna.core._events import (
    BranchDiverged,
    BranchesEvaluated,
    Event,
    MergeCompleted,
    Observer,
    RunFinished,
    RunStarted,
    RunSummary,
    TrainingProgress,
    TransferMeasured,
)
from fm_optuna.tracking.background import BackgroundWriter
from fm_optuna.tracking.notes import MergeRow, decision_table, lambda_note
from fm_optuna.tracking.plots import (
    MergeRecord,
    lambda_csv,
    plot_lambda_trajectory,
    plot_simplex_trials,
)
from fm_optuna.tracking.server_watch import TrackingUnavailable
from fm_optuna.tracking.store import owner_tags
from fm_optuna.tracking.uris import mask_uri

if TYPE_CHECKING:
    from fm_optuna.tracking.store import TrackingStore

logger = logging.getLogger("fm_optuna.tracking")
E = TypeVar("E", bound=Event)

#: RunFinished.status → MLflow run status.
_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}
_PARAM_LIMIT = MAX_PARAM_VAL_LENGTH
_NO_RUN = ""  # buffer key of runs whose creation failed


def metric_key(name: str) -> str:
    """A branch or task name made safe inside an MLflow key (``target+top1`` → ``target_top1``)."""
    return re.sub(r"[^\w.\- ]", "_", name) or "_"


def artifact_url(run_id: str, path: str) -> str:
    """A run's artifact as the MLflow UI serves it, relative to the UI's root (for a note)."""
    return f"get-artifact?path={urllib.parse.quote(path)}&run_uuid={run_id}"


def param_key(name: str) -> str:
    """A configuration key made safe for MLflow (slashes kept as namespaces)."""
    return re.sub(r"[^\w.\- /]", "_", name) or "_"


def weights_text(weights: Mapping[str, float]) -> str:
    """Compact task-weighting vector: ``uci=1,mnist=1`` (tasks with weight 0 left out)."""
    return ",".join(f"{task}={w:g}" for task, w in weights.items() if w != 0.0)


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package, dist in (
        ("torch", "torch"),
        ("optuna", "optuna"),
        ("mlflow", "mlflow"),
        ("fm_optuna", "fm-optuna"),
    ):
        try:
            versions[package] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[package] = "unknown"
    return versions


def _finite_or_none(value: Any) -> Any:
    """JSON without NaN/Infinity (which strict readers reject): non-finite floats become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_none(v) for v in value]
    return value


def final_metrics(summary: RunSummary) -> dict[str, float]:
    """The ``final/*`` metrics of a finished run: ``final/seconds`` always; when it completed,
    ``final/target_val``, ``final/target_test`` and ``final/{val,test}/<task>/<metric>``."""
    metrics = {"final/seconds": float(summary.seconds)}
    if summary.target_val is not None:
        metrics["final/target_val"] = float(summary.target_val)
    if summary.target_test is not None:
        metrics["final/target_test"] = float(summary.target_test)
    for split, values in (("val", summary.val), ("test", summary.test)):
        for task, task_metrics in values.items():
            for name, value in task_metrics.items():
                metrics[f"final/{split}/{metric_key(task)}/{metric_key(name)}"] = float(value)
    return metrics


def transfer_metrics(event: TransferMeasured) -> dict[str, float]:
    """The ``transfer/*`` metrics of a run compared with STL: ``transfer/tg``,
    ``transfer/delta_m``, ``transfer/tg/<task>``, ``transfer/relative/<task>``."""
    metrics = {
        key: float(value)
        for key, value in (("transfer/tg", event.tg), ("transfer/delta_m", event.delta_m))
        if value is not None
    }
    for name, values in (("tg", event.tg_tasks), ("relative", event.relative)):
        for task, value in values.items():
            metrics[f"transfer/{name}/{metric_key(task)}"] = float(value)
    return metrics


def _never_raises(hook: Callable[..., None]) -> Callable[..., None]:
    """An observer hook that cannot stop training: any error (a bug here included) is reported
    like a store failure, and tracking stops."""

    @functools.wraps(hook)
    def guarded(self: _RunLog, *args: Any) -> None:
        try:
            hook(self, *args)
        except Exception as error:
            self.unlogged["events"] += 1
            self._failed(error)

    return guarded


@dataclass
class _Batch:
    metrics: list[Metric] = field(default_factory=list)
    params: list[Param] = field(default_factory=list)
    tags: list[RunTag] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.metrics) + len(self.params) + len(self.tags)

    def counts(self) -> Counter[str]:
        return Counter(metrics=len(self.metrics), params=len(self.params), tags=len(self.tags))


@dataclass
class _Run:
    """One top-level run of the invocation (a method) and, for ForkMerge, its branch runs."""

    event_name: str
    name: str
    run_id: str | None
    params: Mapping[str, Any]
    branches: tuple[str, ...] = ()
    children: dict[str, str | None] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)
    merges: list[MergeRecord] = field(default_factory=list)
    rows: list[MergeRow] = field(default_factory=list)  # the Λ table of the run's note
    scores: dict[str, float] = field(default_factory=dict)  # branch scores of the latest round
    tasks: tuple[str, ...] = ()  # per branch, its tasks as text
    rounds: int | None = None
    figures_drawn: int = 0  # merges the logged figures show
    summary: RunSummary | None = None
    transfer: TransferMeasured | None = None
    status: str | None = None  # None while running

    @property
    def is_forkmerge(self) -> bool:
        return bool(self.branches)

    def run_ids(self) -> list[str | None]:
        return [*self.children.values(), self.run_id]


class _RunLog:
    """Logs the event stream of one invocation to an MLflow experiment, one call at a time.

    Runs in :class:`MlflowTracker`'s background thread only: every method here may wait on the
    store (and on a new store's preparation). Its arguments are the tracker's.
    """

    def __init__(
        self,
        store: TrackingStore,
        *,
        tags: Mapping[str, str] | None = None,
        run_prefix: str = "",
        higher_is_better: bool | None = None,
        flush_every: int = 50,
    ) -> None:
        self.store = store
        self.invocation = uuid.uuid4().hex[:12]
        self._tags = {"fm_optuna.invocation": self.invocation, **owner_tags(), **(tags or {})}
        self._prefix = run_prefix
        self._higher_is_better = higher_is_better
        self._flush_every = max(1, flush_every)
        self._runs: dict[str, _Run] = {}  # by event name, the run now open under that name
        self._done: list[_Run] = []
        self._pending: dict[str, _Batch] = {}
        self._progress_since_flush = 0
        self._direction_hint: tuple[float, Mapping[str, float]] | None = None
        self._workdir: tempfile.TemporaryDirectory[str] | None = None
        self._closed = False
        #: First store error (redacted), ``None`` while everything is logged.
        self.error: str | None = None
        #: What could not be logged after :attr:`error`, by kind (metrics, params, runs, ...).
        self.unlogged: Counter[str] = Counter()
        self._figure_warned = False

    def run_id(self, run: str) -> str | None:
        """The MLflow run id of the event stream's run ``run`` (e.g. "forkmerge"), if open."""
        record = self._runs.get(run)
        return None if record is None else record.run_id

    # --- events ---------------------------------------------------------------------------

    @_never_raises
    def on_run_started(self, event: RunStarted) -> None:
        previous = self._runs.pop(event.run, None)
        if previous is not None:  # restarted without finishing (e.g. a resumed trial)
            self._finish(previous, "KILLED")
        params = event.params
        seed = params.get("seed", "")
        name = f"{self._prefix}{event.run}-seed{seed}" if seed != "" else self._prefix + event.run
        tags = {
            **self._tags,
            "method": event.run,
            "seed": str(seed),
            "benchmark": str(params.get("benchmark", "")),
            "target": str(params.get("target", "")),
            "fm_optuna.role": "forkmerge" if event.branches else "baseline",
        }
        run_id = self._create_run(name, tags)
        run = _Run(event.run, name, run_id, params, branches=tuple(event.branches))
        self._runs[event.run] = run
        if event.branches:
            run.tasks = tuple(
                ", ".join(t for t, w in weights.items() if w != 0.0)
                for weights in event.branches.values()
            )
            dt = int(params.get("dt", 0) or 0)
            run.rounds = math.ceil(event.total_steps / dt) if dt > 0 else None

        batch = self._batch(run_id)
        for key, value in params.items():
            self._param(batch, param_key(str(key)), value)
        for package, version in package_versions().items():
            self._param(batch, f"version/{package}", version)
        taken: set[str] = set()
        for index, (branch, weights) in enumerate(event.branches.items()):
            key = metric_key(branch)
            while key in taken:  # two names that sanitise alike must not share a series
                key += "_"
            taken.add(key)
            run.keys[branch] = key
            self._param(batch, f"branch/{key}/weights", weights_text(weights))
            child_tags = {
                **tags,
                MLFLOW_PARENT_RUN_ID: run_id or "",
                "branch": branch,
                "fm_optuna.role": "branch",
            }
            if run_id is None:
                child_id = None
                self.unlogged["runs"] += 1
            else:
                # Short, so the runs table shows which branch it is: "b0 target".
                child_id = self._create_run(f"b{index} {branch}", child_tags)
            run.children[branch] = child_id
            child = self._batch(child_id)
            self._param(child, "weights", weights_text(weights))
            self._param(child, "tasks", ",".join(t for t, w in weights.items() if w != 0.0))
            self._param(child, "seed", seed)
        self._restore_merges(run, event)
        if event.branches:
            self._note(run)
        self.flush()  # parameters visible in the UI from the start of the run

    def _restore_merges(self, run: _Run, event: RunStarted) -> None:
        """A resumed run's new MLflow run gets the merges made before the resume (from the
        checkpoint), so its metrics, CSV and figures hold the whole Λ trajectory."""
        if not event.resumed_merges:
            return
        self._batch(run.run_id).tags.append(
            RunTag("fm_optuna.resumed_from_round", str(len(event.resumed_merges)))
        )
        for round_index, (step, decision) in enumerate(event.resumed_merges, start=1):
            self._log_decision(run, round_index, step, tuple(run.branches), decision)
            run.rows.append(  # the branches' scores of those rounds are not in the checkpoint
                MergeRow(
                    round=round_index,
                    step=step,
                    weights=tuple(decision.weights),
                    score=decision.score,
                    best_branch="(before the resume)",
                    best_branch_score=math.nan,
                )
            )
            record = {
                "round": round_index,
                "step": step,
                "branches": list(run.branches),
                "lambda": dict(zip(run.branches, decision.weights, strict=True)),
                "score": decision.score,
                "restored_from_checkpoint": True,
                "n_trials": decision.n_trials,
                "decision": decision.to_dict(),
            }
            self._log_text(
                run.run_id,
                json.dumps(_finite_or_none(record), indent=1),
                f"merges/round_{round_index:03d}.json",
            )

    def _log_decision(
        self, run: _Run, round_index: int, step: int, branches: Sequence[str], decision: Any
    ) -> None:
        """Λ and the inner study's figures of one merge, and its record for the pictures."""
        stamp = _now_ms()
        batch = self._batch(run.run_id)
        for branch, weight in zip(branches, decision.weights, strict=True):
            key = run.keys.get(branch, metric_key(branch))
            batch.metrics.append(Metric(f"lambda/{key}", float(weight), stamp, step))
            self._batch(run.children.get(branch)).metrics.append(
                Metric("merge/lambda", float(weight), stamp, step)
            )
        for name, value in (
            ("merge/n_trials", decision.n_trials),
            ("merge/search_seconds", decision.seconds),
            ("merge/best_score", decision.score),
            ("merge/round", round_index),
            ("val/score", decision.score),
        ):
            batch.metrics.append(Metric(name, float(value), stamp, step))
        run.merges.append(
            MergeRecord(
                round=round_index,
                step=step,
                weights=tuple(decision.weights),
                score=decision.score,
                trials=tuple((t.weights, t.score, t.source) for t in decision.trials),
            )
        )

    @_never_raises
    def on_training_progress(self, event: TrainingProgress) -> None:
        run = self._runs.get(event.run)
        if run is None:
            return
        run_id = run.children.get(event.branch) if run.is_forkmerge else run.run_id
        batch = self._batch(run_id)
        stamp = _now_ms()
        for task, loss in event.losses.items():
            batch.metrics.append(
                Metric(f"train/loss/{metric_key(task)}", float(loss), stamp, event.step)
            )
        for key, value in event.metrics.items():
            name = "/".join(metric_key(part) for part in key.split("/"))
            batch.metrics.append(Metric(f"train/{name}", float(value), stamp, event.step))
        self._progress_since_flush += 1
        if self._progress_since_flush >= self._flush_every:
            self.flush()

    @_never_raises
    def on_branch_diverged(self, event: BranchDiverged) -> None:
        """Tag the branch's run with why it sat out the merge of this round."""
        run = self._runs.get(event.run)
        if run is None:
            return
        text = f"round {event.round}: {event.message}"[:_PARAM_LIMIT]
        self._batch(run.children.get(event.branch)).tags.append(
            RunTag("fm_optuna.non_finite", text)
        )

    @_never_raises
    def on_branches_evaluated(self, event: BranchesEvaluated) -> None:
        run = self._runs.get(event.run)
        if run is None:
            return
        stamp = _now_ms()
        run.scores = dict(event.scores)
        for branch, score in event.scores.items():
            batch = self._batch(run.children.get(branch))
            batch.metrics.append(Metric("val/score", float(score), stamp, event.step))
            metrics = event.metrics.get(branch, {})
            for name, value in metrics.items():
                batch.metrics.append(
                    Metric(f"val/{metric_key(name)}", float(value), stamp, event.step)
                )
            if self._direction_hint is None and math.isfinite(score) and metrics:
                self._direction_hint = (float(score), dict(metrics))

    @_never_raises
    def on_merge_completed(self, event: MergeCompleted) -> None:
        run = self._runs.get(event.run)
        if run is None:
            return
        decision, step, stamp = event.decision, event.step, _now_ms()
        self._log_decision(run, event.round, step, event.branches, decision)
        batch = self._batch(run.run_id)
        for name, value in (
            ("merge/gain", event.gain),
            ("merge/best_branch_score", event.best_branch_score),
        ):
            batch.metrics.append(Metric(name, float(value), stamp, step))
        for name, value in event.merged_metrics.items():
            batch.metrics.append(Metric(f"val/{metric_key(name)}", float(value), stamp, step))
        if decision.fallback is not None:  # the latest fallback; every one is in merges/*.json
            text = f"round {event.round}: {decision.fallback}"
            batch.tags.append(RunTag("fm_optuna.merge_fallback", text[:_PARAM_LIMIT]))
        record = {
            "round": event.round,
            "step": step,
            "branches": list(event.branches),
            "lambda": dict(zip(event.branches, decision.weights, strict=True)),
            "score": decision.score,
            "merged_metrics": dict(event.merged_metrics),
            "best_branch_score": event.best_branch_score,
            "gain": event.gain,
            "n_trials": decision.n_trials,
            "decision": decision.to_dict(),
        }
        self._log_text(
            run.run_id,
            json.dumps(_finite_or_none(record), indent=1),
            f"merges/round_{event.round:03d}.json",
        )
        self._log_text(
            run.run_id,
            decision_table(event.round, step, event.branches, decision),
            f"merges/round_{event.round:03d}.md",
        )
        finite = {b: s for b, s in run.scores.items() if math.isfinite(s)}
        run.rows.append(
            MergeRow(
                round=event.round,
                step=step,
                weights=tuple(decision.weights),
                score=decision.score,
                best_branch=max(finite, key=finite.__getitem__) if finite else "–",
                best_branch_score=event.best_branch_score,
            )
        )
        self._note(run)
        self.flush()

    @_never_raises
    def draw_figures(self, event_run: str) -> None:
        """Redraw the open run's Λ pictures from every merge so far (overwritten at every merge:
        a live run shows its trajectory)."""
        run = self._runs.get(event_run)
        if run is not None and run.figures_drawn < len(run.merges):
            self._log_figures(run)

    @_never_raises
    def log_file(self, event_run: str, path: Path, artifact_path: str | None) -> None:
        """A file of the open run ``event_run`` (e.g. a saved merge problem) as an artifact."""
        run = self._runs.get(event_run)
        self._log_file(None if run is None else run.run_id, path, artifact_path)

    @_never_raises
    def on_run_finished(self, event: RunFinished) -> None:
        run = self._runs.pop(event.run, None)
        if run is None:
            return
        summary = run.summary = event.summary
        batch = self._batch(run.run_id)
        stamp = _now_ms()
        step = int(run.params.get("total_steps", 0) or 0)
        for key, value in final_metrics(summary).items():
            batch.metrics.append(Metric(key, value, stamp, step))
        if summary.target_metric:
            batch.tags.append(RunTag("target_metric", summary.target_metric))
        if summary.fail_reason is not None:
            reason = summary.fail_reason[:_PARAM_LIMIT]
            batch.tags.append(RunTag("fm_optuna.fail_reason", reason))
        batch.tags.append(RunTag("fm_optuna.status", summary.status))
        self._finish(run, _STATUS[summary.status])

    @_never_raises
    def on_transfer_measured(self, event: TransferMeasured) -> None:
        """TG and Δm of a run that just finished (logged on it: ``transfer/*``)."""
        run = next((r for r in reversed(self._done) if r.event_name == event.run), None)
        if run is None:
            return
        run.transfer = event
        batch = self._batch(run.run_id)
        stamp = _now_ms()
        step = int(run.params.get("total_steps", 0) or 0)
        for key, value in transfer_metrics(event).items():
            batch.metrics.append(Metric(key, value, stamp, step))
        self.flush()

    def close(self) -> None:
        """Finish what is still open, write the summary, and say what could not be logged."""
        if self._closed:
            return
        self._closed = True
        try:
            for run in list(self._runs.values()):  # training stopped without RunFinished
                self._batch(run.run_id).tags.append(RunTag("fm_optuna.status", "UNFINISHED"))
                self._finish(run, "KILLED")
            self._runs.clear()
            self._write_summary()
            self.flush()
        except Exception as error:  # close runs in a `finally`: it must not mask the result
            self.unlogged["events"] += 1
            self._failed(error)
        finally:
            if self._workdir is not None:
                self._workdir.cleanup()
        if self.error is not None:
            lost = ", ".join(f"{n} {kind}" for kind, n in sorted(self.unlogged.items()) if n)
            logger.warning(
                "MLflow tracking to %s stopped after an error (%s); not logged: %s. "
                "Training results are unaffected.",
                self.store.display_uri,
                self.error,
                lost or "nothing",
            )

    # --- writing ----------------------------------------------------------------------------

    def flush(self) -> None:
        """Write every buffered metric, param and tag: one ``log_batch`` per run (chunked only
        beyond MLflow's per-request limits)."""
        pending, self._pending = self._pending, {}
        self._progress_since_flush = 0
        for run_id, batch in pending.items():
            if run_id == _NO_RUN:
                self.unlogged.update(batch.counts())
                continue
            for metrics, params, tags in _chunks(batch):
                self._call(
                    Counter(metrics=len(metrics), params=len(params), tags=len(tags)),
                    "log_batch",
                    run_id,
                    metrics=metrics,
                    params=params,
                    tags=tags,
                    synchronous=True,
                )

    def _batch(self, run_id: str | None) -> _Batch:
        """The buffer of a run. Runs that could not be created share the buffer under ``""``,
        which :meth:`flush` only counts as not logged."""
        return self._pending.setdefault(run_id or _NO_RUN, _Batch())

    def _param(self, batch: _Batch, key: str, value: Any) -> None:
        # Any URI in a value (an Optuna storage, a database) loses its password.
        text = mask_uri("" if value is None else str(value))
        if len(text) > _PARAM_LIMIT:
            text = text[: _PARAM_LIMIT - 3] + "..."
        batch.params.append(Param(key, text))

    def _create_run(self, name: str, tags: Mapping[str, str]) -> str | None:
        safe = {k: mask_uri(str(v)) for k, v in tags.items()}
        try:
            experiment_id = self.store.experiment_id  # waits for a new store's preparation
        except Exception as error:  # it failed: a store failure like any other (counted below)
            self._failed(error)
            experiment_id = ""
        run = self._call(Counter(runs=1), "create_run", experiment_id, tags=safe, run_name=name)
        return None if run is None else run.info.run_id

    def _finish(self, run: _Run, status: str) -> None:
        run.status = status
        if run.is_forkmerge and run.figures_drawn < len(run.merges):
            self._log_figures(run)
        self.flush()
        for run_id in run.run_ids():
            if run_id is None:
                continue
            self._call(
                Counter(**{"run statuses": 1}),
                "set_terminated",
                run_id,
                status=status,
            )
        self._done.append(run)

    def _log_text(self, run_id: str | None, text: str, artifact_file: str) -> None:
        if run_id is None:
            self.unlogged["artifacts"] += 1
            return
        self._call(Counter(artifacts=1), "log_text", run_id, text, artifact_file)

    def _log_file(self, run_id: str | None, path: Path, artifact_path: str | None = None) -> None:
        if run_id is None:
            self.unlogged["artifacts"] += 1
            return
        self._call(Counter(artifacts=1), "log_artifact", run_id, str(path), artifact_path)

    def _scratch(self) -> Path:
        if self._workdir is None:
            self._workdir = tempfile.TemporaryDirectory(prefix="fm-optuna-tracking-")
        return Path(self._workdir.name)

    def _figure_names(self, run: _Run) -> tuple[str, ...]:
        names = ("lambda_trajectory.png", "lambda_trajectory.csv")
        return (*names, "simplex_trials.png") if len(run.branches) == 3 else names

    def _note(self, run: _Run) -> None:
        """The run's description (markdown, top of its overview): the Λ table so far."""
        text = lambda_note(
            run.name,
            run.branches,
            run.tasks,
            run.rows,
            rounds=run.rounds,
            figures=self._figure_names(run),
            images=[("Λ per merge (stacked)", artifact_url(run.run_id, "lambda_trajectory.png"))]
            if run.rows and run.run_id
            else [],
        )
        self._batch(run.run_id).tags.append(RunTag(MLFLOW_RUN_NOTE, text))

    def _log_figures(self, run: _Run) -> None:
        """Regenerate the Λ pictures from every merge so far and log them (overwriting)."""
        run.figures_drawn = len(run.merges)
        folder = self._scratch() / (run.run_id or "lost")
        folder.mkdir(exist_ok=True)
        names = [run.keys.get(b, b) for b in run.branches]
        self._log_text(run.run_id, lambda_csv(names, run.merges), "lambda_trajectory.csv")
        figures: list[tuple[str, Callable[[Path], None]]] = [
            (
                "lambda_trajectory.png",
                lambda p: plot_lambda_trajectory(run.branches, run.merges, p, title=run.name),
            )
        ]
        if len(run.branches) == 3:
            figures.append(
                ("simplex_trials.png", lambda p: plot_simplex_trials(run.branches, run.merges, p))
            )
        for filename, draw in figures:
            path = folder / filename
            try:
                draw(path)
            except Exception as error:  # a plotting bug must not cost the rest of the logging
                self.unlogged["artifacts"] += 1
                if not self._figure_warned:
                    self._figure_warned = True
                    logger.warning("fm-optuna: could not draw %s (%s)", filename, error)
                continue
            self._log_file(run.run_id, path)

    def _write_summary(self) -> None:
        """The comparison table of this invocation, attached to every method's run."""
        rows = [r for r in self._done if r.summary and r.summary.target_test is not None]
        if not rows:
            return
        higher = self._direction(rows)
        stl = next((r for r in rows if r.event_name == "stl"), None)
        table = []
        for run in rows:
            summary = run.summary
            assert summary is not None and summary.target_test is not None
            tg = None if run.transfer is None else run.transfer.tg
            if run.transfer is None and stl is not None and higher is not None:
                # Runs not compared by run_methods: TG against this invocation's STL run.
                reference = stl.summary.target_test if stl.summary else None
                if reference is not None:
                    tg = (1.0 if higher else -1.0) * (summary.target_test - reference)
            table.append(
                {
                    "method": run.event_name,
                    "run_name": run.name,
                    "run_id": run.run_id,
                    "status": run.status,
                    "target_metric": summary.target_metric,
                    "target_val": summary.target_val,
                    "target_test": summary.target_test,
                    "tg": tg,
                    "seconds": summary.seconds,
                }
            )
        first = rows[0].params
        payload = {
            "experiment": self.store.experiment_name,
            "invocation": self.invocation,
            "benchmark": first.get("benchmark"),
            "target": first.get("target"),
            "seed": first.get("seed"),
            "higher_is_better": higher,
            "tg": "target test metric minus STL's, + is better, in the metric's units",
            "methods": table,
        }
        text_json = json.dumps(_finite_or_none(payload), indent=2)
        text_md = _summary_markdown(payload)
        stamp = _now_ms()
        for run, row in zip(rows, table, strict=True):
            self._log_text(run.run_id, text_json, "summary.json")
            self._log_text(run.run_id, text_md, "summary.md")
            if row["tg"] is not None and run.transfer is None:
                step = int(run.params.get("total_steps", 0) or 0)
                self._batch(run.run_id).metrics.append(
                    Metric("transfer/tg", float(row["tg"]), stamp, step)
                )

    def _direction(self, rows: Sequence[_Run]) -> bool | None:
        if self._higher_is_better is not None:
            return self._higher_is_better
        metric = rows[0].summary.target_metric if rows[0].summary else ""
        if self._direction_hint is None or not metric:
            return None
        score, metrics = self._direction_hint
        value = metrics.get(metric)
        if value is None or value == 0:
            return None
        if math.isclose(score, value):
            return True
        return False if math.isclose(score, -value) else None

    def _call(self, counts: Counter[str], method: str, *args: Any, **kwargs: Any) -> Any:
        """One call of the client's ``method``. After the first failure the store is left alone
        (a dead server would otherwise cost its full retry time at every call) and only counts
        are kept. The client is looked up here: a new store's preparation may still be under
        way (this waits for it) or may have failed (its error is the store's failure)."""
        if self.error is not None:
            self.unlogged.update(counts)
            return None
        try:
            return getattr(self.store.client, method)(*args, **kwargs)
        except Exception as error:
            if _cut_mid_request(error):
                # A server killed while answering: MLflow's client retries a refused connection
                # (minutes, with back-off) but not a response cut short. Once more, then the
                # client waits for the restarted server itself.
                logger.warning(
                    "fm-optuna: MLflow server %s dropped a request: retrying it",
                    self.store.display_uri,
                )
                try:
                    return getattr(self.store.client, method)(*args, **kwargs)
                except Exception as again:
                    error = again
            self.unlogged.update(counts)
            self._failed(error)
            return None

    def _failed(self, error: Exception) -> None:
        """Remember the first error and warn once; later errors only add to the counts."""
        if self.error is not None:
            return
        self.error = self.store.error_line(error)
        if isinstance(error, TrackingUnavailable) and error.already_said:
            # Another tracker of this process said it for this outage; each run's end still
            # says what it lacks.
            logger.debug("MLflow tracking to %s stops: %s", self.store.display_uri, self.error)
            return
        logger.warning(
            "fm-optuna: MLflow tracking to %s failed (%s); training continues without "
            "tracking, and what is not logged is reported at the end.",
            self.store.display_uri,
            self.error,
        )


#: How requests and urllib3 word a connection that broke after the request was sent.
_CUT = re.compile(r"Connection broken|Connection aborted|RemoteDisconnected|IncompleteRead")


def _cut_mid_request(error: Exception) -> bool:
    return bool(_CUT.search(str(error)))


def captured(event: E) -> E:
    """The event as data the training thread can no longer change: every field deep-copied,
    callables (``MergeCompleted.snapshot``, ``merge_problem``, which read the loop's live state
    when called) left out, since the tracker never calls them."""
    values = {}
    for item in dataclasses.fields(event):
        value = getattr(event, item.name)
        values[item.name] = None if callable(value) else copy.deepcopy(value)
    return type(event)(**values)


class MlflowTracker(Observer):
    """Logs the event stream of one invocation to an MLflow experiment, off the training thread.

    Each hook copies its event (:func:`captured`) and queues it for one background thread
    (:class:`~fm_optuna.tracking.background.BackgroundWriter`) that makes the MLflow calls in
    order: runs, batched metrics, merge records, the Λ note, the figures. A hook returns at once,
    except at a merge: the merge's metrics, record and note are written before the hook returns
    (the figures follow in the background), so the next round never starts before MLflow holds
    every event up to that merge. :meth:`close` (called when the
    command ends, also after an exception or a signal) writes what is queued and ends the runs.

    Args:
        store: An opened store (:func:`fm_optuna.tracking.open_store`; a new store may still be
            preparing in the background); its experiment gets the runs.
        tags: Extra tags on every run (e.g. an outer-study trial number).
        run_prefix: Prefix of run names (run names are ``<prefix><method>-seed<seed>``).
        higher_is_better: Direction of the target's primary metric, for the transfer gain in the
            summary (``None``: inferred from the branch scores, else TG is left out).
        flush_every: Progress reports buffered before a write when no merge comes first.

    Example:
        >>> store = open_store(experiment="fm-optuna/toy")  # doctest: +SKIP
        >>> tracker = MlflowTracker(store, higher_is_better=False)  # doctest: +SKIP
        >>> run_methods(problem, config, events=EventStream([tracker]))  # doctest: +SKIP
        >>> tracker.close()  # doctest: +SKIP
    """

    def __init__(
        self,
        store: TrackingStore,
        *,
        tags: Mapping[str, str] | None = None,
        run_prefix: str = "",
        higher_is_better: bool | None = None,
        flush_every: int = 50,
    ) -> None:
        self._log = _RunLog(
            store,
            tags=tags,
            run_prefix=run_prefix,
            higher_is_better=higher_is_better,
            flush_every=flush_every,
        )
        self._writer = BackgroundWriter()
        self._closed = False

    @property
    def store(self) -> TrackingStore:
        return self._log.store

    @property
    def invocation(self) -> str:
        return self._log.invocation

    @property
    def error(self) -> str | None:
        """First store error (redacted), ``None`` while everything is logged."""
        return self._log.error

    @property
    def unlogged(self) -> Counter[str]:
        """What could not be logged after :attr:`error`, by kind (metrics, params, runs, ...)."""
        return self._log.unlogged

    @property
    def background_seconds(self) -> float:
        """Seconds the background thread spent logging (waiting for a new store included)."""
        return self._writer.busy_seconds

    def run_id(self, run: str) -> str | None:
        """The MLflow run id of the event stream's run ``run`` (e.g. "forkmerge"), if open.
        Waits for what is queued, so a run just started has its id."""
        self._writer.wait()
        return self._log.run_id(run)

    # --- events: copied here, logged in the background ---------------------------------------

    def on_run_started(self, event: RunStarted) -> None:
        self._later(self._log.on_run_started, event)

    def on_training_progress(self, event: TrainingProgress) -> None:
        self._later(self._log.on_training_progress, event)

    def on_branch_diverged(self, event: BranchDiverged) -> None:
        self._later(self._log.on_branch_diverged, event)

    def on_branches_evaluated(self, event: BranchesEvaluated) -> None:
        self._later(self._log.on_branches_evaluated, event)

    def on_merge_completed(self, event: MergeCompleted) -> None:
        merged = self._later(self._log.on_merge_completed, event)
        key = f"figures/{event.run}"
        self._writer.submit(functools.partial(self._figures, event.run, key), key=key)
        # A merge is a checkpoint boundary: what MLflow shows is never behind the latest merge,
        # and a SIGKILL in the next round loses nothing up to it. The wait is the merge's own
        # writes; only a new store still being prepared at the first merge makes it longer
        # (no longer than opening it before training did).
        self._writer.wait(merged)

    def on_run_finished(self, event: RunFinished) -> None:
        self._later(self._log.on_run_finished, event)

    def on_transfer_measured(self, event: TransferMeasured) -> None:
        self._later(self._log.on_transfer_measured, event)

    def log_file(self, run: str, path: Path, artifact_path: str | None = None) -> None:
        """Attach a file that stays where it is (e.g. a saved merge problem) to the event
        stream's run ``run``, in order with its events."""
        self._writer.submit(functools.partial(self._log.log_file, run, path, artifact_path))

    def close(self) -> None:
        """Write everything queued, end what is still open (KILLED, ``UNFINISHED``), attach the
        summary, and say what could not be logged; waits for the background thread."""
        if self._closed:
            return
        self._closed = True
        try:
            self._writer.submit(self._log.close)
        finally:
            self._writer.close()

    def _later(self, hook: Callable[[Any], None], event: Any) -> int:
        return self._writer.submit(functools.partial(hook, captured(event)))

    def _figures(self, run: str, key: str) -> None:
        if not self._writer.superseded(key):  # a newer merge's redraw shows this one too
            self._log.draw_figures(run)


def _chunks(batch: _Batch) -> Iterator[tuple[list[Metric], list[Param], list[RunTag]]]:
    metrics, params, tags = batch.metrics, batch.params, batch.tags
    # A param key may be logged once per run; keep the first value of a duplicated key.
    unique: dict[str, Param] = {}
    for param in params:
        unique.setdefault(param.key, param)
    params = list(unique.values())
    while metrics or params or tags:
        take_params = params[:MAX_PARAMS_TAGS_PER_BATCH]
        take_tags = tags[: MAX_PARAMS_TAGS_PER_BATCH - len(take_params)]
        yield metrics[:MAX_METRICS_PER_BATCH], take_params, take_tags
        metrics = metrics[MAX_METRICS_PER_BATCH:]
        params = params[len(take_params) :]
        tags = tags[len(take_tags) :]


def _summary_markdown(payload: Mapping[str, Any]) -> str:
    def number(value: Any) -> str:
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            return "–"
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    direction = {True: "higher is better", False: "lower is better", None: "direction unknown"}
    methods = payload["methods"]
    metric = methods[0].get("target_metric") or "score"
    lines = [
        f"# fm-optuna summary: {payload['experiment']}",
        "",
        f"benchmark `{payload['benchmark']}` · target `{payload['target']}` · seed "
        f"{payload['seed']} · metric `{metric}` ({direction[payload['higher_is_better']]})",
        "",
        "| method | target val | target test | TG vs STL | seconds | run |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for row in methods:
        lines.append(
            f"| {row['method']} | {number(row['target_val'])} | {number(row['target_test'])} | "
            f"{number(row['tg'])} | {number(row['seconds'])} | {row['run_name']} |"
        )
    lines += ["", f"TG: {payload['tg']}."]
    return "\n".join(lines) + "\n"


def _now_ms() -> int:
    return int(time.time() * 1000)
