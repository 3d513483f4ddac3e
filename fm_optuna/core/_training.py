"""The one training loop: a model, an optimizer, an update rule over task losses, n steps.

ForkMerge branches, STL, EW and every other baseline train through :func:`train`; what differs
is only the :class:`UpdateRule` that turns per-task losses into gradients.

Two optional capabilities let a rule carry state without a second loop:

- ``begin_step(step: int) -> None`` (:class:`SteppedRule`): called by :func:`train` before each
  global step (1-based) draws its batches, for rules that change with the step (PTFT's
  pre-train → fine-tune switch, DWA's rounds). ``rule.tasks`` is read again at every step.
- ``learnable_parameters() -> list[Tensor]`` (:class:`LearnableRule`): tensors the rule itself
  learns (UW's log-variances); pass them to :func:`make_optimizer` with the model's.
- ``replay_batches(replay: BatchReplay) -> None`` (:class:`ReplayingRule`): called before each
  ``backward`` with a function that computes the step's losses again, on the very batches the
  step drew, for the model as it is then (IT-MTL scores lookahead steps by Eq. 2 on the same
  batch). The replay redraws from the data generator's state before the step, so it is exact
  for problems whose batches depend only on that generator, as the Problem contract asks.

A rule whose gradients are linear in its losses (a weighted sum) says so with
``linear_in_losses = True``: under mixed precision on CUDA it then gets losses multiplied by a
GradScaler's factor (float16 autocast); any other rule gets bfloat16 autocast, which needs no
scaling, so rules that read loss values (UW, DWA, ...) see the true ones.

Every step's losses are kept on the device until the next report point (every ``log_every``
steps and the end of a :func:`train` call), where they are read in one go: a NaN or infinite
loss then raises :class:`~fm_optuna.errors.NonFiniteTraining` naming the first step and task,
without a host synchronisation per step.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch

from fm_optuna.errors import NonFiniteTraining

if TYPE_CHECKING:
    from torch import nn

    from fm_optuna.config import ForkMergeConfig, RuntimeOptions
    from fm_optuna.problem._tasks import Problem, Split

LossCallback = Callable[[int, dict[str, float]], None]
#: ``model -> {task: loss}`` on this step's batches (see :class:`ReplayingRule`).
BatchReplay = Callable[["nn.Module"], dict[str, torch.Tensor]]
logger = logging.getLogger(__name__)


class UpdateRule(Protocol):
    """Turns one step's per-task losses into ``.grad`` on the model's parameters."""

    @property
    def tasks(self) -> tuple[str, ...]:
        """Tasks whose losses the rule needs this step (read before every step)."""
        ...

    def backward(self, losses: Mapping[str, torch.Tensor], model: nn.Module) -> None: ...


class SteppedRule(UpdateRule, Protocol):
    """A rule told which global step (1-based) comes next, before its batches are drawn."""

    def begin_step(self, step: int) -> None: ...


class LearnableRule(UpdateRule, Protocol):
    """A rule with learnable tensors of its own, optimised together with the model."""

    def learnable_parameters(self) -> list[torch.Tensor]: ...


class ReplayingRule(UpdateRule, Protocol):
    """A rule that evaluates the losses again on this step's batches (e.g. after a lookahead)."""

    def replay_batches(self, replay: BatchReplay) -> None: ...


def rule_parameters(rule: UpdateRule) -> list[torch.Tensor]:
    """The rule's own learnable tensors (empty for rules without any)."""
    learnable = getattr(rule, "learnable_parameters", None)
    return [] if learnable is None else list(learnable())


@dataclass(frozen=True)
class WeightedSum:
    """Σ_k ω_k L_k: a branch's task-weighting vector, STL (ω = e_target) or EW (ω = 1)."""

    weights: Mapping[str, float]
    linear_in_losses: ClassVar[bool] = True

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(task for task, weight in self.weights.items() if weight != 0.0)

    def backward(self, losses: Mapping[str, torch.Tensor], model: nn.Module) -> None:
        total = sum(self.weights[task] * losses[task] for task in self.tasks)
        total.backward()  # type: ignore[union-attr]


def make_optimizer(
    model: nn.Module, config: ForkMergeConfig, extra: Iterable[torch.Tensor] = ()
) -> torch.optim.Optimizer:
    """The configured optimizer over the model's parameters and ``extra`` tensors (a rule's own,
    e.g. UW's); Adam at ``config.lr`` by default."""
    params = [*model.parameters(), *extra]
    if not isinstance(config.optimizer, str):
        return config.optimizer(params)
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)


def make_scheduler(
    optimizer: torch.optim.Optimizer, config: ForkMergeConfig
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """The configured learning-rate schedule over T optimizer steps (``None`` for ``none``)."""
    if not isinstance(config.scheduler, str):
        return config.scheduler(optimizer)
    if config.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.total_steps)
    if config.scheduler == "step":
        every = config.lr_step_size or max(1, config.total_steps // 3)
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=every, gamma=config.lr_gamma)
    return None


@functools.cache
def _note_amp_ignored(device: str) -> None:
    logger.warning("fm-optuna: amp = true is ignored on %s (mixed precision needs CUDA)", device)


@dataclass
class Optimization:
    """What one optimizer step does: the optimizer, its schedule, clipping and mixed precision.

    Build it with :func:`make_optimization`; :func:`train` also accepts a bare optimizer.
    """

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    clip_grad_norm: float | None = None
    scaler: torch.amp.GradScaler | None = None  # set exactly when mixed precision is on

    def step(
        self,
        model: nn.Module,
        problem: Problem,
        rule: UpdateRule,
        tasks: tuple[str, ...],
        generator: torch.Generator,
    ) -> dict[str, torch.Tensor]:
        """One optimizer step on this step's losses; returns them (unscaled)."""
        self.optimizer.zero_grad(set_to_none=True)
        scaled = self.scaler is not None and getattr(rule, "linear_in_losses", False)
        replaying = getattr(rule, "replay_batches", None)
        if replaying is not None:
            replaying(self._replay(problem, tasks, generator, scaled))
        with self._autocast(scaled):
            losses = problem.task_losses(model, tasks, generator)
        if scaled:
            assert self.scaler is not None
            rule.backward({task: self.scaler.scale(loss) for task, loss in losses.items()}, model)
            self.scaler.unscale_(self.optimizer)  # clip and step the true gradients
        else:
            rule.backward(losses, model)
        if self.clip_grad_norm is not None:
            parameters = [p for group in self.optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(parameters, self.clip_grad_norm)
        if scaled:
            assert self.scaler is not None
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        return losses

    def _replay(
        self, problem: Problem, tasks: tuple[str, ...], generator: torch.Generator, scaled: bool
    ) -> BatchReplay:
        """The losses of ``tasks`` on the batches ``generator`` is about to draw, for any model."""
        state = generator.get_state()

        def replay(model: nn.Module) -> dict[str, torch.Tensor]:
            again = torch.Generator(device=generator.device)
            again.set_state(state)
            with self._autocast(scaled):
                return problem.task_losses(model, tasks, again)

        return replay

    def _autocast(self, scaled: bool) -> contextlib.AbstractContextManager[Any]:
        if self.scaler is None:
            return contextlib.nullcontext()
        dtype = torch.float16 if scaled or not torch.cuda.is_bf16_supported() else torch.bfloat16
        return torch.autocast(device_type="cuda", dtype=dtype)

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "scaler": None if self.scaler is None else self.scaler.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])

    def restart_from(
        self,
        fresh: Optimization,
        *,
        schedule: torch.optim.lr_scheduler.LRScheduler | None = None,
    ) -> None:
        """Take ``fresh``'s optimizer state (a reset at a merge); the schedule goes on where it
        was (or where ``schedule`` is), so the learning rate follows one curve over the whole T."""
        schedule = schedule or self.scheduler
        if schedule is not None and fresh.scheduler is not None:
            fresh.scheduler.load_state_dict(schedule.state_dict())
            rates = schedule.get_last_lr()
            for group, lr in zip(fresh.optimizer.param_groups, rates, strict=True):
                group["lr"] = lr
        self.optimizer, self.scheduler = fresh.optimizer, fresh.scheduler


def make_optimization(
    model: nn.Module, config: ForkMergeConfig, extra: Iterable[torch.Tensor] = ()
) -> Optimization:
    """The configured optimizer, schedule, clipping and (on CUDA) mixed precision for ``model``."""
    optimizer = make_optimizer(model, config, extra)
    scaler = None
    if config.amp:
        device = next(model.parameters()).device.type
        if device == "cuda":
            scaler = torch.amp.GradScaler("cuda")
        else:
            _note_amp_ignored(device)
    return Optimization(optimizer, make_scheduler(optimizer, config), config.clip_grad_norm, scaler)


def use_threads(threads: int | None) -> None:
    """The one threads policy of every door (CLI, study files, API): ``threads`` intra-op
    threads for this process (1 by default, see :class:`~fm_optuna.config.RuntimeOptions`), or
    torch's own setting for ``None``."""
    if threads is not None:
        torch.set_num_threads(threads)


def use_runtime(runtime: RuntimeOptions, *, parallel: bool) -> tuple[torch.device, ...]:
    """Apply ``runtime``'s threads policy and return its devices: one, or one per branch with
    ``parallel`` (checked by :func:`~fm_optuna.core._devices.resolve_devices`)."""
    from fm_optuna.core._devices import resolve_devices

    use_threads(runtime.threads)
    return resolve_devices(runtime.device, parallel=parallel)


def seeded_model(problem: Problem, seed: int) -> nn.Module:
    """The problem's model initialised from ``seed``, on the problem's device."""
    torch.manual_seed(seed)
    return problem.make_model().to(problem.device)


def data_generator(problem: Problem, seed: int, stream: int) -> torch.Generator:
    """Independent, reproducible data order per (seed, stream)."""
    generator = torch.Generator(device=problem.device)
    generator.manual_seed(seed * 1_000_003 + stream)
    return generator


def target_score(
    problem: Problem, model: nn.Module, split: Split = "val"
) -> tuple[float, dict[str, float]]:
    """The target's score on ``split`` (oriented so that higher is better) and its metrics."""
    metrics = problem.evaluate(model, split, [problem.target])[problem.target]
    return problem.task(problem.target).score(metrics), metrics


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | Optimization,
    problem: Problem,
    rule: UpdateRule,
    *,
    steps: int,
    generator: torch.Generator,
    start_step: int = 0,
    log_every: int = 25,
    on_losses: LossCallback | None = None,
) -> None:
    """Run ``steps`` optimizer steps; every ``log_every`` steps report mean per-task losses.

    A task's reported mean is over the steps of the window that trained it (a rule's tasks may
    change between steps). Raises :class:`~fm_optuna.errors.NonFiniteTraining` at the first
    report point after a loss became NaN or infinite, naming that loss's step and task.
    """
    optimization = optimizer if isinstance(optimizer, Optimization) else Optimization(optimizer)
    model.train()
    begin_step = getattr(rule, "begin_step", None)
    window: dict[str, list[tuple[int, torch.Tensor]]] = {}
    pending = 0
    last = start_step + steps
    for step in range(start_step + 1, last + 1):
        if begin_step is not None:
            begin_step(step)
        tasks = rule.tasks
        losses = optimization.step(model, problem, rule, tasks, generator)
        for task in tasks:
            window.setdefault(task, []).append((step, losses[task].detach()))
        pending += 1
        if pending == log_every or step == last:
            means = _window_means(window)
            if on_losses is not None:
                on_losses(step, means)
            window.clear()
            pending = 0


def _window_means(window: Mapping[str, list[tuple[int, torch.Tensor]]]) -> dict[str, float]:
    """Each task's mean loss over the window (one host sync per task, not per step).

    Raises:
        NonFiniteTraining: naming the earliest step (then the first task) with a NaN/inf loss.
    """
    means: dict[str, float] = {}
    first: NonFiniteTraining | None = None
    for task, entries in window.items():
        # float64: a mean of finite float32 losses cannot overflow, so non-finite means NaN/inf.
        values = torch.stack([value for _, value in entries]).double()
        mean = float(values.mean())
        if math.isfinite(mean):
            means[task] = mean
            continue
        index = int((~torch.isfinite(values)).nonzero()[0, 0])
        step, value = entries[index][0], float(values[index])
        if first is None or step < first.step:
            first = NonFiniteTraining(task, step, value)
    if first is not None:
        raise first
    return means
