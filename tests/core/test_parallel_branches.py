"""Parallel branches (``parallel_branches``): the same run as sequential training, faults kept."""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import signal
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import torch
from torch import nn

from fm_optuna.core import _loop
from fm_optuna.core._branch_training import BranchFailed, train_in_threads
from fm_optuna.core._checkpoints import Checkpointer, load_checkpoint
from fm_optuna.core._events import EventStream, Observer, TrainingProgress
from fm_optuna.core._loop import ForkMergeConfig, ForkMergeResult, run_forkmerge
from fm_optuna.errors import NonFiniteTraining
from tests.conftest import ToyNet, ToyProblem
from tests.core.test_checkpoints import Crash, CrashAfterRound

CONFIG = ForkMergeConfig(
    total_steps=60, dt=15, branches=3, strategy="grid", grid_resolution=0.25, ranking="given"
)


class DropoutNet(ToyNet):
    """ToyNet with dropout in the trunk: every training step draws from torch's global RNG."""

    def __init__(self, tasks: Sequence[str]) -> None:
        super().__init__(tasks, batch_norm=False)
        self.trunk.append(nn.Dropout(0.3))


class DropoutProblem(ToyProblem):
    def make_model(self) -> nn.Module:
        return DropoutNet(self.task_names)


def run(problem: ToyProblem, *, parallel: bool, **changes: object) -> ForkMergeResult:
    config = dataclasses.replace(CONFIG, parallel_branches=parallel, **changes)
    return run_forkmerge(problem, config)


def assert_same_run(a: ForkMergeResult, b: ForkMergeResult) -> None:
    assert a.lambda_history == b.lambda_history
    assert [d.score for d in a.decisions] == [d.score for d in b.decisions]
    for key, value in a.model.state_dict().items():
        assert torch.equal(value, b.model.state_dict()[key]), key


def test_processes_give_the_sequential_run_bit_for_bit_with_dropout() -> None:
    sequential = run(DropoutProblem(), parallel=False)
    parallel = run(DropoutProblem(), parallel=True)
    assert_same_run(sequential, parallel)
    # The dropout draws matter: another seed's branch randomness gives another trajectory.
    other = run(DropoutProblem(), parallel=True, seed=1)
    assert (
        other.model.state_dict()["trunk.0.weight"]
        .ne(parallel.model.state_dict()["trunk.0.weight"])
        .any()
    )


def test_dropout_draws_do_not_depend_on_the_order_branches_train_in() -> None:
    """Each branch has its own global random state: training the branches in reverse order
    gives every branch the same numbers (without it, branch 1 would see branch 0's leftovers)."""

    def reversed_order(runs, steps, report):  # type: ignore[no-untyped-def]
        from fm_optuna.core._branch_training import train_branch

        outcomes = {}
        for index in reversed(range(len(runs))):
            outcomes[index] = train_branch(
                runs[index], steps, lambda at, losses, i=index: report(i, at, losses)
            )
        return [outcomes[index] for index in range(len(runs))]

    sequential = run(DropoutProblem(), parallel=False)
    original = _loop.round_trainer
    _loop.round_trainer = lambda parallel, devices: reversed_order  # type: ignore[assignment]
    try:
        reversed_run = run(DropoutProblem(), parallel=False)
    finally:
        _loop.round_trainer = original
    assert_same_run(sequential, reversed_run)


def test_threads_give_the_sequential_run_for_a_model_without_global_draws(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sequential = run(ToyProblem(), parallel=False)
    monkeypatch.setattr(_loop, "round_trainer", lambda parallel, devices: train_in_threads)
    threaded = run(ToyProblem(), parallel=True)
    assert_same_run(sequential, threaded)


class _Progress(Observer):
    def __init__(self) -> None:
        self.reports: list[tuple[str, int]] = []

    def on_training_progress(self, event: TrainingProgress) -> None:
        self.reports.append((event.branch, event.step))


def test_every_loss_report_reaches_the_event_stream() -> None:
    def reports(parallel: bool) -> list[tuple[str, int]]:
        observer = _Progress()
        config = dataclasses.replace(CONFIG, parallel_branches=parallel, log_every=5)
        run_forkmerge(DropoutProblem(), config, EventStream([observer]))
        return observer.reports

    sequential, parallel = reports(False), reports(True)
    assert len(sequential) == 3 * 12
    assert sorted(parallel) == sorted(sequential)


def test_a_resumed_parallel_run_continues_the_uninterrupted_one(tmp_path: Path) -> None:
    """Each branch's own random state is in the checkpoint; a sequential checkpoint resumes in
    parallel (``parallel_branches`` does not change what a run trains)."""
    uninterrupted = run(DropoutProblem(), parallel=True)
    path = tmp_path / "checkpoint.pt"
    with pytest.raises(Crash):
        run_forkmerge(
            DropoutProblem(), CONFIG, EventStream([Checkpointer(path), CrashAfterRound(2)])
        )
    resumed = run_forkmerge(
        DropoutProblem(),
        dataclasses.replace(CONFIG, parallel_branches=True),
        resume_from=load_checkpoint(path),
    )
    assert resumed.resumed_from_round == 2
    assert_same_run(uninterrupted, resumed)


def test_a_non_finite_branch_sits_out_as_in_a_sequential_round() -> None:
    def problem() -> ToyProblem:
        return ToyProblem(nan_task="t3", nan_after=0)  # every loss of t3 is NaN

    config = {"branches": 2}  # target only, and all tasks: only the second diverges
    sequential = run(problem(), parallel=False, **config)
    parallel = run(problem(), parallel=True, **config)
    assert [d.fallback for d in parallel.decisions] == [d.fallback for d in sequential.decisions]
    assert all("went non-finite" in (d.fallback or "") for d in parallel.decisions)
    assert_same_run(sequential, parallel)
    with pytest.raises(NonFiniteTraining, match="every branch of round 1"):
        run(ToyProblem(nan_task="t0", nan_after=0), parallel=True)


class _Raising(ToyProblem):
    """Raises (or kills its own process) in training; only in a forked child."""

    def __init__(self, action: str) -> None:
        super().__init__()
        self.action, self.parent = action, os.getpid()

    def task_losses(
        self, model: nn.Module, tasks: Sequence[str], generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        if os.getpid() != self.parent and "t3" in tasks:
            if self.action == "raise":
                raise ValueError("the data loader broke")
            if self.action == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(5)  # "sleep": a slow branch, for the interrupt test
        return super().task_losses(model, tasks, generator)


def test_an_error_in_a_branch_process_is_raised_with_its_type() -> None:
    with pytest.raises(ValueError, match="the data loader broke"):
        run(_Raising("raise"), parallel=True)
    assert not multiprocessing.active_children()


def test_a_killed_branch_process_is_named() -> None:
    with pytest.raises(BranchFailed, match=r"branch `all` ended without a result \(exit code -9\)"):
        run(_Raising("kill"), parallel=True)
    assert not multiprocessing.active_children()


class _Interrupted(Exception):
    pass


@pytest.fixture
def alarm() -> Iterator[None]:
    def interrupt(signum: int, frame: object) -> None:
        raise _Interrupted

    previous = signal.signal(signal.SIGALRM, interrupt)
    yield
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, previous)


def test_an_interrupted_round_leaves_no_branch_process_behind(alarm: None) -> None:
    signal.setitimer(signal.ITIMER_REAL, 1.0)
    started = time.perf_counter()
    with pytest.raises(_Interrupted):
        run(_Raising("sleep"), parallel=True)
    assert time.perf_counter() - started < 4  # did not wait for the sleeping branch
    assert not multiprocessing.active_children()


@pytest.mark.parametrize("ranking", ["prepass", "merge"])
def test_the_ranking_runs_train_in_parallel_with_the_same_outcome(ranking: str) -> None:
    """The pre-pass (and the merge-weights ranking) trains one run per auxiliary: branches too."""
    from fm_optuna.core._ranking import rank_auxiliaries
    from fm_optuna.core._training import seeded_model

    problem = DropoutProblem()
    initial = seeded_model(problem, 0).state_dict()

    def ranked(parallel: bool) -> tuple[tuple[str, ...], tuple[float, ...] | None]:
        config = dataclasses.replace(
            CONFIG, ranking=ranking, ranking_steps=10, parallel_branches=parallel
        )
        result = rank_auxiliaries(problem, config, initial)
        return result.order, result.relevance

    sequential = ranked(False)
    assert sequential[1] is not None and len(set(sequential[1])) > 1  # real scores
    assert ranked(True) == sequential
