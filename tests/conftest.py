"""Shared fixtures: a tiny synthetic multi-task problem that trains in milliseconds."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import pytest
import torch
from torch import nn

from fm_optuna.core._loop import ForkMergeConfig, ForkMergeResult, run_forkmerge
from fm_optuna.problem._tasks import Problem, Split, Task, TaskMetrics

# Small models on a shared 2-core machine: one intra-op thread avoids OpenMP spin-waiting,
# which made tiny ops ~1000x slower whenever the other core was busy.
torch.set_num_threads(1)


class ToyNet(nn.Module):
    def __init__(self, tasks: Sequence[str], *, batch_norm: bool) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(6, 16)]
        if batch_norm:
            layers.append(nn.BatchNorm1d(16))
        layers.append(nn.Tanh())
        self.trunk = nn.Sequential(*layers)
        self.heads = nn.ModuleDict({task: nn.Linear(16, 1) for task in tasks})

    def forward(self, x: torch.Tensor, task: str) -> torch.Tensor:
        return self.heads[task](self.trunk(x)).squeeze(-1)


class ToyProblem(Problem):
    """K regression tasks with separate data; tasks differ by a rotated true weight vector.

    ``full_batch=True`` makes every step use a task's whole training set, so gradients are
    deterministic (used by the Appendix-A equivalence tests). ``nan_task`` makes that task's loss
    NaN from its ``nan_after + 1``-th computation on (counted over the problem's lifetime).
    """

    name = "toy"

    def __init__(
        self,
        n_tasks: int = 4,
        *,
        batch_norm: bool = True,
        full_batch: bool = False,
        noise_task: bool = False,
        nan_task: str | None = None,
        nan_after: int = 0,
    ) -> None:
        self.tasks = tuple(
            Task(f"t{i}", metric="mse", higher_is_better=False) for i in range(n_tasks)
        )
        self.target = "t0"
        self.device = torch.device("cpu")
        self.batch_norm = batch_norm
        self.full_batch = full_batch
        self.nan_task, self.nan_after, self.nan_calls = nan_task, nan_after, 0
        data = torch.Generator().manual_seed(1234)
        base = torch.randn(6, generator=data)
        self.data: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        for i, task in enumerate(self.task_names):
            w = base + 0.5 * i * torch.randn(6, generator=data)
            if noise_task and i == n_tasks - 1:
                w = -3 * base
            splits = {}
            for split, n in (("train", 64), ("val", 48), ("test", 48)):
                x = torch.randn(n, 6, generator=data)
                splits[split] = (x, torch.tanh(x @ w) + 0.05 * torch.randn(n, generator=data))
            self.data[task] = splits

    def make_model(self) -> nn.Module:
        return ToyNet(self.task_names, batch_norm=self.batch_norm)

    def task_losses(
        self, model: nn.Module, tasks: Sequence[str], generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        losses = {}
        for task in tasks:
            x, y = self.data[task]["train"]
            if not self.full_batch:
                index = torch.randint(len(x), (16,), generator=generator)
                x, y = x[index], y[index]
            losses[task] = nn.functional.mse_loss(model(x, task), y)
            if task == self.nan_task:
                self.nan_calls += 1
                if self.nan_calls > self.nan_after:
                    losses[task] = losses[task] * math.nan
        return losses

    def evaluate(
        self, model: nn.Module, split: Split, tasks: Sequence[str] | None = None
    ) -> dict[str, TaskMetrics]:
        was_training = model.training
        model.eval()
        out = {}
        with torch.no_grad():
            for task in tasks or self.task_names:
                x, y = self.data[task][split]
                out[task] = {"mse": float(nn.functional.mse_loss(model(x, task), y))}
        model.train(was_training)
        return out

    def target_chunks(
        self, model: nn.Module, split: Split = "val", chunks: int = 1
    ) -> Iterator[tuple[float, int]]:
        x, y = self.data[self.target][split]
        for part_x, part_y in zip(
            torch.tensor_split(x, chunks), torch.tensor_split(y, chunks), strict=True
        ):
            was_training = model.training
            model.eval()
            with torch.no_grad():
                mse = float(nn.functional.mse_loss(model(part_x, self.target), part_y))
            model.train(was_training)
            yield -mse, len(part_y)

    def target_loss(self, model: nn.Module, split: Split = "val") -> torch.Tensor:
        x, y = self.data[self.target][split]
        was_training = model.training
        model.eval()
        loss = nn.functional.mse_loss(model(x, self.target), y)
        model.train(was_training)
        return loss


@pytest.fixture
def toy_problem() -> ToyProblem:
    return ToyProblem()


def run_tiny_forkmerge(problem: Problem) -> ForkMergeResult:
    """Four steps of ForkMerge with two branches and two merges on ``problem``: the end-to-end
    check every benchmark gets. Each merge's Λ must lie on the simplex with a finite score."""
    config = ForkMergeConfig(
        total_steps=4, dt=2, branches=2, strategy="grid", grid_resolution=0.5, ranking="given"
    )
    result = run_forkmerge(problem, config)
    assert result.steps == [2, 4] and len(result.decisions) == 2
    for decision in result.decisions:
        assert len(decision.weights) == 2 and min(decision.weights) >= 0
        assert sum(decision.weights) == pytest.approx(1.0) and math.isfinite(decision.score)
    return result


class _Scalar(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Parameter(torch.zeros(1))
        self.heads = nn.ModuleDict()


class Parabolas(Problem):
    """L_k(θ) = (θ − c_k)², θ shared, starting at 0: at θ = 0 task k's gradient is −2 c_k, and
    every lookahead is computable by hand."""

    name = "parabolas"

    def __init__(self, centres: dict[str, float]) -> None:
        self.centres = centres
        self.tasks = tuple(Task(name, metric="mse", higher_is_better=False) for name in centres)
        self.target = next(iter(centres))
        self.device = torch.device("cpu")

    def make_model(self) -> nn.Module:
        return _Scalar()

    def task_losses(
        self, model: nn.Module, tasks: Sequence[str], generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        return {t: ((model.shared - self.centres[t]) ** 2).sum() for t in tasks}

    def evaluate(
        self, model: nn.Module, split: Split, tasks: Sequence[str] | None = None
    ) -> dict[str, TaskMetrics]:
        losses = self.task_losses(model, tasks or self.task_names, torch.Generator())
        return {t: {"mse": float(v)} for t, v in losses.items()}
