"""``fm-optuna bench``: what ForkMerge adds on top of training its branches, measured in one run.

Every figure is a ratio of wall times measured in the same process, so it is comparable across
machines; with ``repeats`` > 1 each timing keeps its fastest repetition.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any

import torch

from fm_optuna.baselines import make_baseline, run_baseline
from fm_optuna.config import ForkMergeConfig
from fm_optuna.core._branch_training import RoundTrainer, train_in_threads
from fm_optuna.core._events import Observer
from fm_optuna.core._loop import run_forkmerge
from fm_optuna.core._ranking import plan_branches
from fm_optuna.core._training import (
    WeightedSum,
    data_generator,
    make_optimization,
    seeded_model,
    train,
)
from fm_optuna.problem._tasks import Problem


def train_branches_alone(problem: Problem, config: ForkMergeConfig) -> float:
    """Seconds to train the plan's L branches for T steps each with no fork, merge or search."""
    model = seeded_model(problem, config.seed)
    initial = copy.deepcopy(model.state_dict())
    branches, _ = plan_branches(
        problem, ForkMergeConfig(**{**config.__dict__, "ranking": "given"}), initial
    )
    started = time.perf_counter()
    for index, branch in enumerate(branches):
        model.load_state_dict(initial)
        train(
            model,
            make_optimization(model, config),
            problem,
            WeightedSum(branch.weights),
            steps=config.total_steps,
            generator=data_generator(problem, config.seed, index),
            log_every=config.log_every,
            on_losses=lambda step, losses: None,
        )
    return time.perf_counter() - started


# --- tracking cost (issue #3) -------------------------------------------------------------------


class _Timed(Observer):
    """Forwards every hook to ``inner`` and adds up the seconds spent in it: the observer's own
    cost, which machine load does not blur the way it blurs two whole runs."""

    def __init__(self, inner: Observer) -> None:
        self.inner, self.seconds = inner, 0.0

    def _timed(self, hook: str, *args: Any) -> None:
        tic = time.perf_counter()
        getattr(self.inner, hook)(*args)
        self.seconds += time.perf_counter() - tic

    def on_run_started(self, event: Any) -> None:
        self._timed("on_run_started", event)

    def on_training_progress(self, event: Any) -> None:
        self._timed("on_training_progress", event)

    def on_branch_diverged(self, event: Any) -> None:
        self._timed("on_branch_diverged", event)

    def on_branches_evaluated(self, event: Any) -> None:
        self._timed("on_branches_evaluated", event)

    def on_merge_completed(self, event: Any) -> None:
        self._timed("on_merge_completed", event)

    def on_run_finished(self, event: Any) -> None:
        self._timed("on_run_finished", event)

    def on_transfer_measured(self, event: Any) -> None:
        self._timed("on_transfer_measured", event)

    def close(self) -> None:
        self._timed("close")


@dataclasses.dataclass(frozen=True)
class TrackedRun:
    """One tracked ForkMerge run's seconds (see :func:`tracked_forkmerge`)."""

    seconds: float  # wall, from opening the new store to the last write
    store_open: float  # opening the store, its preparation in the background included
    observer: float  # inside the tracker's hooks, on the training thread
    background: float  # the tracker's background thread at work (waiting on the store included)
    error: str | None  # the tracking error, if logging failed


def tracked_forkmerge(problem: Problem, config: ForkMergeConfig) -> TrackedRun:
    """One ForkMerge run logged to MLflow on a new temporary SQLite store, as ``fm-optuna run``
    makes it: the clock starts before the store is opened (a new one is prepared while the
    pre-pass and the first round run) and stops once the last write is done (figures, last
    batch, summary)."""
    import tempfile

    from fm_optuna.core._events import EventStream
    from fm_optuna.tracking import MlflowTracker, open_store

    with tempfile.TemporaryDirectory(prefix="fm-optuna-bench-") as folder:
        started = time.perf_counter()
        store = open_store(
            f"sqlite:///{folder}/mlflow.db", experiment="fm-optuna/bench", background=True
        )
        higher = problem.task(problem.target).higher_is_better
        tracker = MlflowTracker(store, higher_is_better=higher)
        timed = _Timed(tracker)
        events = EventStream([timed])
        try:
            run_forkmerge(problem, config, events)  # the run ends itself, as every door's does
        finally:
            events.close()
        return TrackedRun(
            seconds=time.perf_counter() - started,
            store_open=store.opening_seconds,
            observer=timed.seconds,
            background=tracker.background_seconds,
            error=tracker.error,
        )


# --- end tracking cost ------------------------------------------------------------------------


def _fastest(repeats: int, measure: Callable[[], Any]) -> Any:
    return min(
        (measure() for _ in range(repeats)), key=lambda r: r[0] if isinstance(r, tuple) else r
    )


def _passes(result: Any) -> float:
    return sum(decision.validation_passes for decision in result.decisions)


def _final_val(result: Any) -> float:
    return result.decisions[-1].score if result.decisions else float("nan")


def _same_decisions(a: Any, b: Any) -> bool:
    return [(d.weights, d.score) for d in a.decisions] == [
        (d.weights, d.score) for d in b.decisions
    ]


def _same_run(a: Any, b: Any) -> bool:
    state = b.model.state_dict()
    return _same_decisions(a, b) and all(
        torch.equal(value, state[key]) for key, value in a.model.state_dict().items()
    )


def run_bench(
    problem: Problem, config: ForkMergeConfig, *, repeats: int = 1, tracking: bool = True
) -> dict[str, Any]:
    """Every ratio of the bench, each from runs in this process (``tracking=False``: without the
    tracked run, so MLflow is never imported)."""

    def forkmerge(
        evaluation: str, *, parallel: bool = False, trainer: RoundTrainer | None = None
    ) -> Callable[[], tuple[float, Any]]:
        flags = {
            "full_evaluation": evaluation == "full",
            "pruned_evaluation": evaluation == "pruned",
            "parallel_branches": parallel,
        }

        def measure() -> tuple[float, Any]:
            changed = dataclasses.replace(config, **flags)
            result = run_forkmerge(problem, changed, trainer=trainer)
            return result.seconds - result.timings["ranking"], result

        return measure

    def equal_weighting() -> float:
        return run_baseline(make_baseline("ew"), problem, config).seconds

    config = dataclasses.replace(config, full_evaluation=False, pruned_evaluation=False)
    alone = _fastest(repeats, lambda: train_branches_alone(problem, config))
    # The default run, then the same seed and training with every candidate scored whole, and
    # with pruned candidate evaluation: what differs is the search.
    fm_seconds, fm = _fastest(repeats, forkmerge("exact"))
    full_seconds, fm_full = _fastest(repeats, forkmerge("full"))
    pruned_seconds, fm_pruned = _fastest(repeats, forkmerge("pruned"))
    # Parallel branches: processes (what parallel_branches does on a CPU), and threads, the
    # alternative it was chosen over.
    parallel_seconds, fm_parallel = _fastest(repeats, forkmerge("exact", parallel=True))
    threads_seconds, fm_threads = _fastest(
        repeats, forkmerge("exact", parallel=True, trainer=train_in_threads)
    )
    # tracking (issue #3): right after the same run untracked, so both see the same machine.
    tracked = (
        min((tracked_forkmerge(problem, config) for _ in range(repeats)), key=lambda r: r.seconds)
        if tracking
        else TrackedRun(math.nan, math.nan, math.nan, math.nan, None)
    )
    ew = _fastest(repeats, equal_weighting)
    full_share = fm_full.timings["search"] / full_seconds
    pruned_share = fm_pruned.timings["search"] / pruned_seconds
    t = fm.timings
    overhead = {k: t[k] for k in ("evaluate", "search", "merge")}
    report = {
        "setup": (
            f"{problem.name} target={problem.target} T={config.total_steps} Δt={config.dt} "
            f"L={len(fm.branches)} strategy={config.strategy} merge_trials={config.merge_trials} "
            f"rounds={config.rounds} device={problem.device}"
        ),
        "ratios": {
            "forkmerge / branches alone": {
                "value": fm_seconds / alone,
                "goal": 1.10,
                "what": "ForkMerge wall time (pre-pass excluded) over its L branches trained "
                "T steps alone",
            },
            "merge-search share": {
                "value": t["search"] / fm_seconds,
                "goal": 0.05,
                "what": "share of the ForkMerge run spent in the inner studies (evaluations "
                "included), default evaluation: candidates that can change neither the decision "
                "nor the sampler's proposals are stopped (decisions "
                + ("identical to" if _same_decisions(fm, fm_full) else "DIFFERENT from")
                + " full evaluation's)",
            },
            "merge-search share, full evaluation": {
                "value": full_share,
                "goal": None,
                "what": "the same run with --full-evaluation (every candidate on the whole "
                "validation set)",
            },
            "merge-search share, pruned evaluation": {
                "value": pruned_share,
                "goal": None,
                "what": f"the same with --pruned-evaluation ({config.evaluation_chunks} "
                "validation parts; candidates that can no longer win are stopped)",
            },
            "pruned / full merge-search share": {
                "value": pruned_share / full_share,
                "goal": 0.5,
                "what": "what pruned evaluation leaves of the full search's share "
                f"(decision val {_final_val(fm_pruned):.2f} vs {_final_val(fm_full):.2f}; "
                f"{_passes(fm_pruned) / max(_passes(fm_full), 1e-12):.2f} of its validation "
                "forwards)",
            },
            "default / full validation passes": {
                "value": _passes(fm) / max(_passes(fm_full), 1e-12),
                "goal": None,
                "what": "validation forwards of the default search over the full one",
            },
            "parallel / sequential branches": {
                "value": parallel_seconds / fm_seconds,
                "goal": 0.70,
                "what": "the same ForkMerge run with --parallel-branches (a process per branch, "
                "one intra-op thread each) over one branch after another; decisions and final "
                "model "
                + ("identical" if _same_run(fm, fm_parallel) else "DIFFERENT")
                + f" (train {fm_parallel.timings['train']:.1f} s vs {t['train']:.1f} s)",
            },
            "branches in threads / in processes": {
                "value": threads_seconds / parallel_seconds,
                "goal": None,
                "what": "the same with a thread per branch instead (shares torch's global "
                "generator, so a dropout model's draws would interleave; decisions "
                + ("identical" if _same_run(fm, fm_threads) else "DIFFERENT")
                + " here, a model without global draws)",
            },
            "forkmerge / ew": {
                "value": fm_seconds / ew,
                "goal": None,
                "what": "ForkMerge over EW (one model) wall time",
            },
            "tracking on / off": {  # tracking (issue #3, #20)
                "value": tracked.seconds / fm.seconds,
                "goal": 1.03,
                "what": "the same ForkMerge run logged to MLflow over untracked; tracked from "
                "opening a new temporary SQLite store (prepared in the background) to the last "
                "write" + (f" (TRACKING FAILED: {tracked.error})" if tracked.error else ""),
            },
            "time in the MLflow observer": {  # tracking (issue #3, #20)
                "value": tracked.observer / tracked.seconds,
                "goal": None,
                "what": f"share of that tracked run spent inside the observer's hooks on the "
                f"training thread (copying events, waiting at merges for their records); its "
                f"background thread worked {tracked.background:.1f} s (figures, notes, "
                f"batches, waiting for the store); the new store took {tracked.store_open:.1f} "
                "s to open",
            },
            "ranking pre-pass / forkmerge": {
                "value": t["ranking"] / fm_seconds,
                "goal": None,
                "what": f"cost of the {fm.ranking.method} ranking relative to the ForkMerge run",
            },
        },
        "seconds": {
            "branches_alone": alone,
            "forkmerge": fm_seconds,
            "forkmerge_parallel": parallel_seconds,
            "forkmerge_parallel_threads": threads_seconds,
            "ew": ew,
            **overhead,
            "train": t["train"],
            "search_full": fm_full.timings["search"],
            "search_pruned": fm_pruned.timings["search"],
            "ranking": t["ranking"],
            "forkmerge_untracked": fm.seconds,  # tracking (issue #3): pre-pass included
            "forkmerge_tracked": tracked.seconds,
            "tracking_store_open": tracked.store_open,
            "tracking_observer": tracked.observer,
            "tracking_background": tracked.background,
        },
    }
    if not tracking:
        for key in ("tracking on / off", "time in the MLflow observer"):
            del report["ratios"][key]
    return report
