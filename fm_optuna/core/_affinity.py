"""The lookahead inter-task affinity of Fifty et al., a measurement of task relevance.

:mod:`fm_optuna.core._ranking` turns it into Alg. 4's order of the auxiliaries (beside the official
pre-pass). Following "Measuring and Harnessing Transference" (Fifty et al.): *one* short joint
run (all tasks, equal weights) in which, at every measured step t and for every source task i,
the shared parameters θ_s take a lookahead step on task i alone and

    Z^t_{i→j} = 1 − L_j(X_j^t, θ_s − Δ_i, θ_j) / L_j(X_j^t, θ_s, θ_j),

averaged over the measured steps. Z_{i→j} > 0: a step on i lowers j's loss on the same batch.

Choices, all documented in the paper's own experiments:

- The lookahead step Δ_i simulates the run's optimizer (Adam: the update Adam would make with
  gradient g_i from its current moments, as Fifty et al. do for their Adam-trained models);
  ``lookahead="sgd"`` uses η · g_i instead (the paper's Eq. for SGD).
- Task-specific parameters (heads) and every task's batch X_j^t are held fixed across the
  lookaheads of one step, so Z measures only the effect through the shared parameters.
  BatchNorm statistics are restored after the lookaheads.
- Our tasks draw separate batches, so X_j^t is task j's own batch of step t (replayed exactly from
  the generator state it was drawn with).

Example:
    >>> result = task_affinity(problem, config, initial_state, steps=50)  # doctest: +SKIP
    >>> plot_affinity(result.matrix, result.tasks, "affinity.png")  # doctest: +SKIP
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fm_optuna.core._gradients import task_gradients
from fm_optuna.core._training import data_generator, make_optimizer, seeded_model
from fm_optuna.errors import invalid, one_of

if TYPE_CHECKING:
    from torch import nn

    from fm_optuna.config import ForkMergeConfig
    from fm_optuna.problem._tasks import Problem

LOOKAHEADS = ("adam", "sgd")
_STREAM = 20_000  # the joint run's data stream, apart from ForkMerge's branches and the pre-pass


@dataclass(frozen=True)
class AffinityResult:
    """Z_{i→j} averaged over the measured steps of one short joint run.

    Attributes:
        tasks: Row and column order of ``matrix``.
        matrix: ``matrix[i, j]`` = Z_{tasks[i] → tasks[j]}; NaN for columns not measured.
        steps: Steps of the joint run.
        measured: Steps at which the lookaheads were taken.
        seconds: Wall time of the whole run.
        lookahead: ``adam`` or ``sgd``.
    """

    tasks: tuple[str, ...]
    matrix: np.ndarray
    steps: int
    measured: int
    seconds: float
    lookahead: str

    def onto(self, task: str) -> dict[str, float]:
        """Z_{i→task} for every source task i (the column of ``task``)."""
        column = self.tasks.index(task)
        return {name: float(self.matrix[i, column]) for i, name in enumerate(self.tasks)}

    def to_dict(self) -> dict[str, Any]:
        return {
            "tasks": list(self.tasks),
            "matrix": [[None if math.isnan(v) else float(v) for v in row] for row in self.matrix],
            "steps": self.steps,
            "measured": self.measured,
            "seconds": self.seconds,
            "lookahead": self.lookahead,
        }


def _adam_update(
    optimizer: torch.optim.Optimizer, params: Sequence[nn.Parameter], grads: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """The step Adam would take with ``grads`` from its current state, without taking it."""
    group = optimizer.param_groups[0]
    beta1, beta2 = group["betas"]
    lr, eps = group["lr"], group["eps"]
    updates = []
    for p, g in zip(params, grads, strict=True):
        state = optimizer.state.get(p, {})
        t = float(state["step"]) + 1 if "step" in state else 1.0
        m = state["exp_avg"] * beta1 + (1 - beta1) * g if state else (1 - beta1) * g
        v = state["exp_avg_sq"] * beta2 + (1 - beta2) * g * g if state else (1 - beta2) * g * g
        m_hat = m / (1 - beta1**t)
        v_hat = v / (1 - beta2**t)
        updates.append(lr * m_hat / (v_hat.sqrt() + eps))
    return updates


def task_affinity(
    problem: Problem,
    config: ForkMergeConfig,
    initial_state: Mapping[str, torch.Tensor],
    *,
    steps: int,
    every: int = 1,
    lookahead: str = "adam",
    sgd_lr: float | None = None,
    onto: Sequence[str] | None = None,
) -> AffinityResult:
    """Lookahead inter-task affinity over all tasks during a short joint (EW) run.

    Args:
        problem: The tasks and their batches.
        config: Optimizer and seed of the joint run (the data stream is seeded by it).
        initial_state: The model's starting state (ForkMerge's θ_0 for the same seed).
        steps: Length of the joint run in optimizer steps.
        every: Measure the lookaheads every ``every`` steps (1: at every step).
        lookahead: ``adam`` (simulate the run's Adam update) or ``sgd`` (``sgd_lr`` · g_i).
        sgd_lr: Step size of the SGD lookahead (default: the optimizer's learning rate).
        onto: Columns j to measure (default: every task); the ranking needs only the target's.
    """
    if not isinstance(steps, int) or steps < 1:
        raise invalid("steps", steps, "a positive integer")
    if not isinstance(every, int) or not 1 <= every <= steps:
        raise invalid("every", every, f"an integer from 1 to steps ({steps})")
    if lookahead not in LOOKAHEADS:
        raise one_of("lookahead", lookahead, LOOKAHEADS)
    if sgd_lr is not None and not sgd_lr >= 0:
        raise invalid("sgd_lr", sgd_lr, "a non-negative number")
    tasks = problem.task_names
    columns = tuple(onto) if onto is not None else tasks
    for task in columns:
        if task not in tasks:
            raise one_of("onto", task, tasks)
    started = time.perf_counter()
    model = seeded_model(problem, config.seed)
    model.load_state_dict(initial_state)
    model.train()
    optimizer = make_optimizer(model, config)
    if lookahead == "adam" and not isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
        raise invalid("lookahead", lookahead, "sgd when the optimizer is not Adam or AdamW")
    generator = data_generator(problem, config.seed, _STREAM)
    shared = problem.shared_parameters(model)
    ids = {id(p) for p in shared}
    params = [*shared, *(p for p in model.parameters() if p.requires_grad and id(p) not in ids)]
    sums = np.zeros((len(tasks), len(tasks)))
    measured = 0
    for step in range(1, steps + 1):
        optimizer.zero_grad(set_to_none=True)
        batch_states, losses = {}, {}
        for task in tasks:
            batch_states[task] = generator.get_state()
            losses[task] = problem.task_losses(model, [task], generator)[task]
        # One backward per task: the per-task gradients serve both the lookaheads and the joint
        # step (their sum), and with per-task batches they cost one summed backward.
        rows = task_gradients(losses, tasks, params)
        for index, p in enumerate(params):
            p.grad = torch.stack([row[index] for row in rows]).sum(0)
        if (step - 1) % every == 0:
            before = {task: float(losses[task].detach()) for task in columns}
            for i, row in enumerate(rows):
                g_shared = row[: len(shared)]
                if lookahead == "adam":
                    update = _adam_update(optimizer, shared, g_shared)
                else:
                    eta = optimizer.param_groups[0]["lr"] if sgd_lr is None else sgd_lr
                    update = [eta * g for g in g_shared]
                after = _lookahead_losses(
                    problem, model, shared, update, columns, batch_states, generator
                )
                for task in columns:
                    j = tasks.index(task)
                    sums[i, j] += 1.0 - after[task] / before[task]
            measured += 1
        optimizer.step()
    matrix = np.full((len(tasks), len(tasks)), np.nan)
    for task in columns:
        j = tasks.index(task)
        matrix[:, j] = sums[:, j] / max(measured, 1)
    return AffinityResult(tasks, matrix, steps, measured, time.perf_counter() - started, lookahead)


@torch.no_grad()
def _lookahead_losses(
    problem: Problem,
    model: nn.Module,
    shared: Sequence[nn.Parameter],
    update: Sequence[torch.Tensor],
    columns: Sequence[str],
    batch_states: Mapping[str, torch.Tensor],
    generator: torch.Generator,
) -> dict[str, float]:
    """L_j on each column's own batch after θ_s ← θ_s − update; θ_s and buffers are restored."""
    saved = [p.detach().clone() for p in shared]
    buffers = [b.detach().clone() for b in model.buffers()]  # BatchNorm statistics
    for p, delta in zip(shared, update, strict=True):
        p.sub_(delta)
    replay = torch.Generator(device=generator.device)
    after = {}
    for task in columns:
        replay.set_state(batch_states[task])
        after[task] = float(problem.task_losses(model, [task], replay)[task])
    for p, value in zip(shared, saved, strict=True):
        p.copy_(value)
    for b, value in zip(model.buffers(), buffers, strict=True):
        b.copy_(value)
    return after


def plot_affinity(
    matrix: np.ndarray | Sequence[Sequence[float]],
    names: Sequence[str],
    path: str | Path,
    *,
    title: str = "Lookahead inter-task affinity Z(i → j)",
) -> Path:
    """Heat map of a task-relationship matrix, rows = source (auxiliary) i, columns = affected j.

    Red is positive (i helps j), blue negative, white zero, grey not measured, as the paper's
    Fig. 8/14. The colour scale is set by the off-diagonal cells (the relationships between
    tasks), so a large self-affinity on the diagonal saturates instead of washing them out.
    Values are printed in the cells, ×100 when they are all small.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = np.asarray(matrix, dtype=float)
    off_diagonal = values[~np.eye(*values.shape, dtype=bool) & np.isfinite(values)]
    finite = off_diagonal if off_diagonal.size else values[np.isfinite(values)]
    bound = float(np.abs(finite).max()) if finite.size else 1.0
    scale = 100.0 if 0 < bound < 0.1 else 1.0
    shown = scale * values
    bound = scale * bound or 1.0
    n = len(names)
    figure, axis = plt.subplots(figsize=(1.2 * n + 2.5, 1.0 * n + 1.8))
    colours = matplotlib.colormaps["RdBu_r"].with_extremes(bad="lightgrey")
    image = axis.imshow(np.ma.masked_invalid(shown), cmap=colours, vmin=-bound, vmax=bound)
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            if np.isfinite(shown[i, j]):
                dark = abs(shown[i, j]) > 0.6 * bound
                axis.text(
                    j,
                    i,
                    f"{shown[i, j]:.2f}",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if dark else "black",
                )
    axis.set_xticks(range(n), names, rotation=45, ha="right")
    axis.set_yticks(range(n), names)
    axis.set_xlabel("affected (target) task j")
    axis.set_ylabel("source (auxiliary) task i")
    axis.set_title(title + (" × 100" if scale != 1.0 else ""), fontsize=10)
    figure.colorbar(image, ax=axis, fraction=0.046, pad=0.04)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


__all__ = [
    "LOOKAHEADS",
    "AffinityResult",
    "plot_affinity",
    "task_affinity",
]
