"""Tasks and the Problem seam every benchmark plugs into.

A :class:`Problem` owns data and a model factory for a set of tasks, one of which is the
*target*. The training loop only ever asks a problem for per-task losses on freshly drawn
batches and for per-task validation/test metrics; it knows nothing of images or molecules.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch
    from torch import nn

Split = Literal["val", "test"]
TaskMetrics = dict[str, float]


@dataclass(frozen=True)
class Task:
    """One objective: a loss (computed by the problem) and metrics with one primary metric.

    Args:
        name: Unique task name, e.g. ``"mnist"`` or ``"mu"``.
        metric: Name of the primary metric in the task's metrics, e.g. ``"accuracy"``.
        higher_is_better: Whether a larger primary metric is better (``False`` for MAE).
    """

    name: str
    metric: str = "accuracy"
    higher_is_better: bool = True

    def score(self, metrics: Mapping[str, float]) -> float:
        """The primary metric oriented so that larger is always better."""
        value = float(metrics[self.metric])
        return value if self.higher_is_better else -value


class Problem(abc.ABC):
    """A multi-task problem: tasks, a target, a model factory, batches and evaluation.

    Subclasses keep their data on ``self.device`` so drawing a batch is an index operation.
    Every random draw takes an explicit ``torch.Generator`` so that a seed fixes a run.
    """

    name: str
    tasks: tuple[Task, ...]
    target: str
    device: torch.device

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(task.name for task in self.tasks)

    @property
    def auxiliaries(self) -> tuple[str, ...]:
        return tuple(name for name in self.task_names if name != self.target)

    def task(self, name: str) -> Task:
        for task in self.tasks:
            if task.name == name:
                return task
        raise KeyError(name)

    @abc.abstractmethod
    def make_model(self) -> nn.Module:
        """A freshly initialised model (seeded by the caller through ``torch.manual_seed``)."""

    @abc.abstractmethod
    def task_losses(
        self, model: nn.Module, tasks: Sequence[str], generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        """Draw one training batch per task (or one shared batch) and return each task's loss.

        When tasks have separate data (one domain per task), each task's loss is computed on its
        own batch drawn in this step; when tasks share inputs, one batch serves all of them.
        """

    @abc.abstractmethod
    def evaluate(
        self, model: nn.Module, split: Split, tasks: Sequence[str] | None = None
    ) -> dict[str, TaskMetrics]:
        """Metrics of ``tasks`` (all tasks when ``None``) on ``split``, model in eval mode."""

    def shared_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """The trainable parameters every task's loss goes through (the trunk, θ_s).

        Gradient-manipulation baselines (MGDA, PCGrad, GCS, ...) and the lookahead task affinity
        act on these only; the rest (task heads) get plain per-task gradients. Default: every
        trainable parameter whose name does not start with ``heads.``, the convention of this
        project's models (task heads live in ``model.heads``). Override for other layouts.
        """
        return [
            parameter
            for name, parameter in model.named_parameters()
            if parameter.requires_grad and not name.startswith("heads.")
        ]

    def describe(self) -> dict[str, object]:
        """Flat, loggable description of the problem's options (sizes, target, ...)."""
        return {"benchmark": self.name, "target": self.target}
