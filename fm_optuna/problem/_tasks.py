"""Tasks and the Problem seam every benchmark plugs into.

A :class:`Problem` owns data and a model factory for a set of tasks, one of which is the
*target*. The training loop only ever asks a problem for per-task losses on freshly drawn
batches and for per-task validation/test metrics; it knows nothing of images or molecules.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator, Mapping, Sequence
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

    The problem's ``evaluate`` must return ``metric`` among this task's metrics; the merge
    search and the outer study optimise the target's ``metric`` in its direction.

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

    A subclass sets four attributes and implements three methods:

    - ``name`` (str): shown in runs and messages, e.g. ``"diabetes"``;
    - ``tasks`` (tuple of :class:`Task`): distinct names, each with its primary metric;
    - ``target`` (str): the name of one of ``tasks``; the others are the auxiliaries;
    - ``device`` (``torch.device``): where the model and the data live;
    - :meth:`make_model` returns a fresh ``nn.Module`` (the caller seeds ``torch``); put the
      task heads under ``model.heads`` (or override :meth:`shared_parameters`);
    - :meth:`task_losses` returns ``{task: scalar loss tensor}`` for *every* requested task, on
      batches drawn with the given ``torch.Generator`` (so a seed fixes the data order);
    - :meth:`evaluate` returns ``{task: {metric: float}}`` for the requested tasks (all when
      ``None``) on ``"val"`` or ``"test"``, with each task's ``Task.metric`` among the metrics.

    :meth:`describe` (loggable options) and :meth:`shared_parameters` have defaults. Keep the
    data on ``device`` so drawing a batch is an index operation. A factory
    ``build(*, target, seed, device, **options) -> Problem`` makes the problem usable from the
    command line and study files as ``module.path:build``; :func:`fm_optuna.check_problem`
    checks all of the above on one draw.

    Example:
        >>> from examples.diabetes import build
        >>> problem = build(target="progression")
        >>> problem.target, problem.auxiliaries
        ('progression', ('bmi', 's5', 'noise'))
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

    def target_chunks(
        self, model: nn.Module, split: Split = "val", chunks: int = 1
    ) -> Iterator[tuple[float, int]]:
        """Optional: the target's score on ``chunks`` consecutive parts of ``split``, lazily.

        Yields ``(score, examples)`` per part, oriented like :meth:`Task.score`; the
        example-weighted mean over all parts is the target's score on the whole split. A merge
        search with pruned evaluation stops reading as soon as a candidate cannot win, so a part
        should cost only its own forwards. Default: the whole split as one part (no saving).
        """
        metrics = self.evaluate(model, split, [self.target])[self.target]
        yield self.task(self.target).score(metrics), 1

    #: The highest score one example of the target can have in :meth:`target_example_scores`
    #: (100 for an accuracy in percent, 0 for a negated error); ``None`` without that method.
    target_example_score_max: float | None = None

    def target_example_scores(
        self, model: nn.Module, index: torch.Tensor | None = None, split: Split = "val"
    ) -> torch.Tensor:
        """Optional: the target's score of each example ``index`` of ``split`` (all when
        ``None``; a 1-D tensor,
        oriented like :meth:`Task.score`), such that the mean over every example is the target's
        score on the split, and none exceeds :attr:`target_example_score_max`.

        With it, pruned candidate evaluation is exact: a candidate is scored on the examples
        earlier candidates found hardest first and stopped once even the best possible score on
        the rest could not make it win (see :func:`fm_optuna.search.search_merge`). Problems that
        do not override it keep the chunked, noise-aware rule of :meth:`target_chunks`.
        """
        raise NotImplementedError(f"{self.name} has no per-example target scores")

    def target_loss(self, model: nn.Module, split: Split = "val") -> torch.Tensor:
        """Optional: the target's mean loss on ``split``, differentiable in the model's parameters
        and buffers, model in eval mode (what the ``gradient`` merge strategy descends).

        Problems that do not override it do not support ``gradient``
        (see :func:`has_capability`).
        """
        raise NotImplementedError(f"{self.name} has no differentiable target_loss")

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
        """Flat, loggable description of the problem's options (sizes, target, ...); no key is
        required (``benchmark`` and ``target`` are filled in from ``name`` and ``target``)."""
        return {"benchmark": self.name, "target": self.target}


def has_capability(problem: Problem, name: str) -> bool:
    """Whether ``problem`` overrides the optional method ``name`` (``target_chunks``,
    ``target_loss``, ``target_example_scores``) rather than inheriting :class:`Problem`'s
    default."""
    return getattr(type(problem), name) is not getattr(Problem, name)


def describe_problem(problem: Problem) -> dict[str, object]:
    """``describe()`` with the keys reports rely on filled in (``benchmark``, ``target``): a
    problem's own ``describe()`` need not return them."""
    return {"benchmark": problem.name, "target": problem.target, **problem.describe()}


JOINT_TARGET = "all_tasks"


class JointTarget(Problem):
    """App. A.4: one model for all tasks through a pseudo-target task.

    The pseudo-target ``all_tasks`` has loss L_0 = (1/K) Σ_j L_j and score P_0 = Σ_j P_j (each
    P_j oriented so that larger is better); every original task is one of its auxiliaries, so
    Alg. 4 (ν^1 = pseudo-target only, ..., ν^K = everything) searches for the model that is good
    on all tasks at once.
    """

    def __init__(self, base: Problem) -> None:
        self.base = base
        self.name = base.name
        self.device = base.device
        self.target = JOINT_TARGET
        self.tasks = (Task(JOINT_TARGET, metric="score_sum"), *base.tasks)

    def make_model(self) -> nn.Module:
        return self.base.make_model()

    def shared_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return self.base.shared_parameters(model)

    def task_losses(
        self, model: nn.Module, tasks: Sequence[str], generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        wanted = [task for task in tasks if task != JOINT_TARGET]
        needed = self.base.task_names if JOINT_TARGET in tasks else wanted
        losses = self.base.task_losses(model, needed, generator)
        out = {task: losses[task] for task in wanted}
        if JOINT_TARGET in tasks:
            out[JOINT_TARGET] = sum(losses.values()) / len(losses)  # type: ignore[assignment]
        return out

    def evaluate(
        self, model: nn.Module, split: Split, tasks: Sequence[str] | None = None
    ) -> dict[str, TaskMetrics]:
        wanted = list(tasks or self.task_names)
        needed = self.base.task_names if JOINT_TARGET in wanted else wanted
        metrics = self.base.evaluate(model, split, needed)
        out = {task: metrics[task] for task in wanted if task != JOINT_TARGET}
        if JOINT_TARGET in wanted:
            total = sum(self.base.task(task).score(metrics[task]) for task in self.base.task_names)
            out[JOINT_TARGET] = {"score_sum": total}
        return out

    def describe(self) -> dict[str, object]:
        return {
            **self.base.describe(),
            "target": JOINT_TARGET,
            "joint_over": ",".join(self.base.task_names),
        }


def for_plan(problem: Problem, plan: str) -> Problem:
    """The problem a plan trains on: the joint plan wraps it in the pseudo-target (App. A.4)."""
    if plan == "joint" and not isinstance(problem, JointTarget):
        return JointTarget(problem)
    return problem
