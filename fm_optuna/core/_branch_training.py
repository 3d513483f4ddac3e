"""How a round's branches train their Δt steps: one after another, or all at once.

The branches of a round are independent until the merge, so they may train concurrently
(``parallel_branches``). The result is the same as training them one after another:

- **Own randomness.** Every branch draws its batches from its own generator (as always) *and*
  its model's global draws (dropout, ``torch.rand`` in a forward) from its own copy of torch's
  global random state, seeded from (seed, branch) and kept in checkpoints. A branch therefore
  sees the same random numbers whether it trains first, last or alongside the others.
- **On the CPU: one process per branch**, forked at the start of each round with one intra-op
  thread. Processes, not threads, because torch has one global CPU generator per process:
  threads would interleave their dropout draws in whatever order the scheduler runs them. A
  fork inherits the branch (model, optimizer, generators) without copying it up front, and
  sends back the trained state, which the parent loads; so the parent's branches, checkpoints,
  events and merge are exactly those of a sequential round, and the round is bit-for-bit the
  same as one trained sequentially with one intra-op thread (the default ``threads``). Loss
  reports are forwarded while the branches train, so progress and tracking stay live.
- **On CUDA: one thread per branch**, each on its own CUDA stream of the one device (CUDA
  cannot be forked). The threads share the device's generator, so a model that draws global
  random numbers on the device gets a different (still valid) sequence from a sequential round;
  a model that does not gets the same result up to the non-determinism CUDA kernels have anyway.
- **On several CUDA devices: one thread per device** (``device = "cuda:0,cuda:1"``), training
  that device's branches one after another on its own stream, each branch's draws from its own
  state on that device's generator: the sequential round's numbers (see
  :mod:`fm_optuna.core._devices` for where the results can still differ).

Every branch trains on its own :attr:`BranchRun.problem`: the run's problem, or its replica on
the branch's device.

A branch whose loss goes non-finite is reported back as in a sequential round; any other error
in a branch (in its process or thread) is raised in the training loop with the branch named.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import os
import pickle
import queue
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import TYPE_CHECKING, Any

import torch

from fm_optuna.core._devices import normalised
from fm_optuna.core._training import Optimization, WeightedSum, train
from fm_optuna.errors import FmOptunaError, NonFiniteTraining

if TYPE_CHECKING:
    from torch import nn

    from fm_optuna.core._branches import Branch
    from fm_optuna.problem._tasks import Problem

#: ``(branch index, step, mean losses)``: a branch's loss report, forwarded to the loop.
BranchReport = Callable[[int, int, dict[str, float]], None]


class BranchRandomness:
    """A branch's own copy of torch's global random state (CPU, and the CUDA device's)."""

    def __init__(self, seed: int, device: torch.device) -> None:
        self.cpu = torch.Generator().manual_seed(seed).get_state()
        self.cuda = (
            torch.Generator(device=device).manual_seed(seed).get_state()
            if device.type == "cuda"
            else None
        )
        self._device = device

    @contextlib.contextmanager
    def active(self, *, cpu: bool = True) -> Iterator[None]:
        """Global draws inside come from (and advance) this branch's state; the process's own
        state is back afterwards. ``cpu=False``: the device's generator only (threads on
        several devices share the process's CPU generator)."""
        outer_cpu = torch.get_rng_state() if cpu else None
        outer_cuda = None if self.cuda is None else torch.cuda.get_rng_state(self._device)
        if outer_cpu is not None:
            torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self._device)
        try:
            yield
        finally:
            if outer_cpu is not None:
                self.cpu = torch.get_rng_state()
                torch.set_rng_state(outer_cpu)
            if self.cuda is not None and outer_cuda is not None:
                self.cuda = torch.cuda.get_rng_state(self._device)
                torch.cuda.set_rng_state(outer_cuda, self._device)

    def state_dict(self) -> dict[str, torch.Tensor | None]:
        return {"cpu": self.cpu.clone(), "cuda": None if self.cuda is None else self.cuda.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor | None]) -> None:
        if state.get("cpu") is not None:
            self.cpu = state["cpu"]  # type: ignore[assignment]
        if self.cuda is not None and state.get("cuda") is not None:
            self.cuda = state["cuda"]


def branch_randomness(seed: int, index: int, device: torch.device) -> BranchRandomness:
    """Branch ``index``'s global random state for a run seeded ``seed`` (its own stream, apart
    from the data generators' and the model initialisation's)."""
    return BranchRandomness(seed * 1_000_003 + 500_009 + index, device)


@dataclass
class BranchRun:
    """A live branch: its weighting, model, optimizer (with schedule), random streams and the
    problem it trains on (model, generators and data all on that problem's device)."""

    branch: Branch
    model: nn.Module
    optimization: Optimization
    generator: torch.Generator
    problem: Problem
    #: Set when the branch's loss went non-finite this round (cleared when it is re-forked).
    diverged: NonFiniteTraining | None = None
    randomness: BranchRandomness | None = field(default=None)

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.optimization.optimizer

    def state(self) -> dict[str, Any]:
        """What training changes: model, optimizer (with schedule and scaler), random streams."""
        return {
            "model": self.model.state_dict(),
            "optimization": self.optimization.state_dict(),
            "generator": self.generator.get_state(),
            "randomness": None if self.randomness is None else self.randomness.state_dict(),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimization.load_state_dict(state["optimization"])
        self.generator.set_state(state["generator"])
        if self.randomness is not None and state["randomness"] is not None:
            self.randomness.load_state_dict(state["randomness"])


@dataclass(frozen=True)
class RoundSteps:
    """The steps every branch trains this round."""

    start: int
    length: int
    log_every: int


def train_branch(
    run: BranchRun,
    steps: RoundSteps,
    report: Callable[[int, dict[str, float]], None],
    *,
    draws: contextlib.AbstractContextManager[None] | None = None,
) -> NonFiniteTraining | None:
    """Train one branch its round; the non-finite loss, if any. ``draws``: where global random
    draws come from meanwhile (default: the branch's own state, CPU and device; threads that
    share a generator pass another)."""
    if draws is None:
        draws = contextlib.nullcontext() if run.randomness is None else run.randomness.active()
    with draws:
        try:
            train(
                run.model,
                run.optimization,
                run.problem,
                WeightedSum(run.branch.weights),
                steps=steps.length,
                generator=run.generator,
                start_step=steps.start,
                log_every=steps.log_every,
                on_losses=report,
            )
        except NonFiniteTraining as error:
            return error
    return None


class BranchFailed(FmOptunaError):
    """A branch's process or thread ended without a result (it raised, or it was killed)."""


def train_sequentially(
    runs: Sequence[BranchRun], steps: RoundSteps, report: BranchReport
) -> list[NonFiniteTraining | None]:
    """The branches one after another, in this process."""
    return [
        train_branch(run, steps, lambda at, losses, i=index: report(i, at, losses))
        for index, run in enumerate(runs)
    ]


def train_in_processes(
    runs: Sequence[BranchRun], steps: RoundSteps, report: BranchReport
) -> list[NonFiniteTraining | None]:
    """Every branch in a process forked for this round (see the module docstring)."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()  # a forked child would otherwise write the parent's pending output again
    context = torch.multiprocessing.get_context("fork")
    children, pipes = [], {}
    try:
        for index, run in enumerate(runs):
            receiving, sending = context.Pipe(duplex=False)
            child = context.Process(
                target=_child_round,
                args=(sending, index, run, steps),
                name=f"fm-optuna branch {run.branch.name}",
                daemon=True,
            )
            child.start()
            sending.close()
            children.append(child)
            pipes[receiving] = index
        return _collect(runs, pipes, children, report)
    finally:
        for child in children:
            if child.is_alive():
                child.kill()  # the round was interrupted: its branches are not needed any more
            child.join()


def _child_round(pipe: Connection, index: int, run: BranchRun, steps: RoundSteps) -> None:
    """A forked child: train the branch, send its reports as they come and then its state."""
    # A signal to the group (Ctrl-C, Slurm's SIGTERM) is the parent's to handle: it ends the
    # round and kills its children; a child must not die first and look like a crash.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with_parent()
    torch.set_num_threads(1)
    try:
        error = train_branch(run, steps, lambda at, losses: pipe.send(("losses", at, losses)))
        buffer = io.BytesIO()
        torch.save(run.state(), buffer)
        diverged = None if error is None else (error.task, error.step, error.value)
        pipe.send(("done", buffer.getvalue(), diverged))
    except BaseException as error:
        pipe.send(("failed", _portable(error)))
    finally:
        pipe.close()
        os._exit(0)  # no atexit handlers, no flushing of inherited buffers


def _die_with_parent() -> None:
    """Linux: SIGKILL this child when its parent dies (a SIGKILLed parent cannot kill it)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


_PR_SET_PDEATHSIG = 1


def _portable(error: BaseException) -> BaseException:
    """The error itself when it survives pickling, else a BranchFailed with its text."""
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:
        return BranchFailed(f"{type(error).__name__}: {error}")
    return error


def _collect(
    runs: Sequence[BranchRun],
    pipes: dict[Connection, int],
    children: Sequence[Any],
    report: BranchReport,
) -> list[NonFiniteTraining | None]:
    """Forward reports until every child has sent its state; load each into its branch."""
    results: dict[int, NonFiniteTraining | None] = {}
    while pipes:
        for pipe in wait(list(pipes)):
            index = pipes[pipe]  # type: ignore[index]
            try:
                message = pipe.recv()  # type: ignore[union-attr]
            except EOFError:
                children[index].join()
                raise BranchFailed(
                    f"the process of branch `{runs[index].branch.name}` ended without a result "
                    f"(exit code {children[index].exitcode})"
                ) from None
            kind, *content = message
            if kind == "losses":
                report(index, *content)
                continue
            del pipes[pipe]  # type: ignore[arg-type]
            if kind == "failed":
                raise content[0]
            state, diverged = content
            runs[index].load_state(torch.load(io.BytesIO(state), weights_only=False))
            results[index] = None if diverged is None else NonFiniteTraining(*diverged)
    return [results[index] for index in range(len(runs))]


def train_in_threads(
    runs: Sequence[BranchRun], steps: RoundSteps, report: BranchReport
) -> list[NonFiniteTraining | None]:
    """Every branch in a thread of this process (on CUDA each on its own stream); reports are
    forwarded from the loop's thread, in the order they came. The threads share the process's
    random state (see the module docstring)."""

    def train_one(index: int, post: _Post) -> NonFiniteTraining | None:
        run = runs[index]
        with _own_stream(_device_of(run)):
            return train_branch(
                run,
                steps,
                lambda at, losses: post(index, at, losses),
                draws=contextlib.nullcontext(),
            )

    return _in_threads([[index] for index in range(len(runs))], train_one, report)


def train_on_devices(
    runs: Sequence[BranchRun], steps: RoundSteps, report: BranchReport
) -> list[NonFiniteTraining | None]:
    """One thread per problem copy (one per device), training its branches one after another
    on its own stream, each branch's global draws from its own state on that device.

    Threads whose devices share a generator (several copies on the CPU, which only a test
    makes) take turns per branch, so every branch still sees its own numbers.
    """
    groups: dict[int, list[int]] = {}
    for index, run in enumerate(runs):
        groups.setdefault(id(run.problem), []).append(index)
    turns = {_generator_of(_device_of(run)): threading.Lock() for run in runs}

    def train_one(index: int, post: _Post) -> NonFiniteTraining | None:
        run = runs[index]
        device = _device_of(run)
        draws = (
            contextlib.nullcontext()
            if run.randomness is None
            else run.randomness.active(cpu=device.type == "cpu")
        )
        with turns[_generator_of(device)], _own_stream(device):
            return train_branch(run, steps, lambda at, losses: post(index, at, losses), draws=draws)

    return _in_threads(list(groups.values()), train_one, report)


#: ``(branch index, step, mean losses)`` posted from a worker thread to the loop's.
_Post = Callable[[int, int, dict[str, float]], None]


def _in_threads(
    groups: Sequence[Sequence[int]],
    train_one: Callable[[int, _Post], NonFiniteTraining | None],
    report: BranchReport,
) -> list[NonFiniteTraining | None]:
    """One thread per group of branch indices, training them in order with ``train_one``;
    reports are forwarded from the calling thread, in the order they came. The first error is
    raised there once every thread has stopped (a thread starts no further branch after it)."""
    messages: queue.Queue[tuple[str, int, Any]] = queue.Queue()
    stop = threading.Event()

    def post(index: int, at: int, losses: dict[str, float]) -> None:
        messages.put(("losses", index, (at, losses)))

    def work(indices: Sequence[int]) -> None:
        for index in indices:
            if stop.is_set():
                return
            try:
                messages.put(("done", index, train_one(index, post)))
            except BaseException as failure:
                messages.put(("failed", index, failure))
                return

    workers = [threading.Thread(target=work, args=(group,), daemon=True) for group in groups]
    for worker in workers:
        worker.start()
    expected = sum(len(group) for group in groups)
    results: dict[int, NonFiniteTraining | None] = {}
    try:
        while len(results) < expected:
            kind, index, content = messages.get()
            if kind == "losses":
                report(index, *content)
            elif kind == "failed":
                raise content
            else:
                results[index] = content
    finally:
        stop.set()
        for worker in workers:
            worker.join()
    return [results[index] for index in range(expected)]


def _device_of(run: BranchRun) -> torch.device:
    return torch.device(run.problem.device)


def _generator_of(device: torch.device) -> str:
    """Which of torch's global generators ``device`` draws from: one for the CPU, one per GPU."""
    return str(normalised(device)) if device.type == "cuda" else device.type


@contextlib.contextmanager
def _own_stream(device: torch.device) -> Iterator[None]:
    """On CUDA: the block runs on ``device`` (current in this thread) on a new stream, after
    the work already queued there (θ* copied in at the fork), and is finished on exit."""
    if device.type != "cuda":
        yield
        return
    with torch.cuda.device(device):
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            yield
        stream.synchronize()


#: ``(runs, steps, report) -> per-branch non-finite loss or None``; each run trains on its own
#: :attr:`BranchRun.problem`.
RoundTrainer = Callable[
    [Sequence[BranchRun], RoundSteps, BranchReport], list[NonFiniteTraining | None]
]


def round_trainer(parallel: bool, devices: Sequence[torch.device]) -> RoundTrainer:
    """How this run's rounds train: sequentially, in processes (CPU), in threads (CUDA), or
    one thread per device (several devices)."""
    if not parallel:
        return train_sequentially
    if len(devices) > 1:
        return train_on_devices
    return train_in_threads if devices[0].type == "cuda" else train_in_processes
