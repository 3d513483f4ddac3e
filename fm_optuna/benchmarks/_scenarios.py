"""What the CTR-style benchmarks share: a click-like and a conversion-like task per scenario.

AliExpress (scenarios = countries) and its MovieLens stand-in (scenarios = user groups) differ
only in where their rows come from. Both keep, per split and scenario, a dict of tensors
``categorical``, ``numerical`` and one 0/1 label per task kind; both train a shared-bottom (or
ESMM) model whose towers are the task heads; both draw one batch per scenario per step, shared by
that scenario's tasks, and score each task by AUC on its scenario's rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from fm_optuna.benchmarks._images import eval_mode
from fm_optuna.datasets.ctr import SharedBottom, auc
from fm_optuna.errors import one_of
from fm_optuna.problem._tasks import Problem, Split, Task, TaskMetrics

MODELS: tuple[str, ...] = ("shared_bottom", "esmm")
EVAL_CHUNK = 16_384  # rows per evaluation forward: bounds memory, not a tuning knob

#: ``rows[split][scenario]``: ``categorical`` (long), ``numerical`` (float) and one float 0/1
#: label tensor per task kind, all with one entry per row.
Rows = dict[str, dict[str, dict[str, torch.Tensor]]]


class ScenarioCTRProblem(Problem):
    """Tasks ``<scenario>_<kind>`` for every scenario and both kinds (click-like first).

    Subclasses set :attr:`kinds` and, in their constructor, :attr:`scenarios`, :attr:`_rows`,
    :attr:`field_dims`, :attr:`numerical`, and the model options; then call
    :meth:`_make_tasks`.
    """

    #: The two task kinds: the click-like one, then the conversion-like one (ESMM's pair).
    kinds: tuple[str, str]
    #: Hidden sizes of the shared bottom and of each tower (``None``: SharedBottom's defaults).
    bottom: tuple[int, ...] | None = None
    tower: tuple[int, ...] | None = None

    target: str
    scenarios: tuple[str, ...]
    batch_size: int
    model_kind: str
    embed_dim: int
    field_dims: list[int]
    numerical: int
    options: dict[str, object]
    _rows: Rows

    def _make_tasks(self) -> None:
        self.tasks = tuple(
            Task(f"{scenario}_{kind}", metric="auc")
            for scenario in self.scenarios
            for kind in self.kinds
        )

    def _split_task(self, task: str) -> tuple[str, str]:
        """``(scenario, kind)`` of one of this problem's tasks."""
        scenario, _, kind = task.rpartition("_")
        if scenario not in self.scenarios or kind not in self.kinds:
            raise one_of("task", task, self.task_names)
        return scenario, kind

    def _by_scenario(self, tasks: Sequence[str]) -> dict[str, list[str]]:
        grouped: dict[str, list[str]] = {}
        for task in tasks:
            grouped.setdefault(self._split_task(task)[0], []).append(task)
        return grouped

    def _length(self, rows: dict[str, torch.Tensor]) -> int:
        return len(rows[self.kinds[0]])

    def shared_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """Embeddings and the bottom MLP; each task's tower is its own (the ``heads`` here)."""
        return [
            parameter
            for name, parameter in model.named_parameters()
            if parameter.requires_grad and not name.startswith("towers.")
        ]

    def make_model(self) -> SharedBottom:
        """Shared embeddings and bottom, one tower per task (ESMM pairs with ``model="esmm"``)."""
        click, conversion = self.kinds
        esmm = (
            {f"{s}_{conversion}": f"{s}_{click}" for s in self.scenarios}
            if self.model_kind == "esmm"
            else None
        )
        sizes = {"bottom": self.bottom, "tower": self.tower}
        return SharedBottom(
            self.field_dims,
            self.numerical,
            self.task_names,
            embed_dim=self.embed_dim,
            esmm=esmm,
            **{name: value for name, value in sizes.items() if value is not None},
        )

    def task_losses(
        self, model: nn.Module, tasks: Sequence[str], generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        """One batch per scenario, shared by that scenario's tasks; binary cross-entropy each."""
        losses: dict[str, torch.Tensor] = {}
        for scenario, names in self._by_scenario(tasks).items():
            rows = self._rows["train"][scenario]
            index = torch.randint(
                self._length(rows), (self.batch_size,), generator=generator, device=self.device
            )
            logits = model(rows["categorical"][index], rows["numerical"][index], names)
            for k, task in enumerate(names):
                label = rows[self._split_task(task)[1]][index]
                losses[task] = F.binary_cross_entropy_with_logits(logits[:, k], label)
        return {task: losses[task] for task in tasks}

    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, split: Split, tasks: Sequence[str] | None = None
    ) -> dict[str, TaskMetrics]:
        """AUC and mean binary cross-entropy of each task on its scenario's ``split`` rows.

        The AUC is NaN when a task's labels on ``split`` are all of one class.
        """
        if split not in ("val", "test"):
            raise one_of("split", split, ("val", "test"))
        names = self.task_names if tasks is None else tuple(tasks)
        results: dict[str, TaskMetrics] = {}
        with eval_mode(model):
            for scenario, members in self._by_scenario(names).items():
                rows = self._rows[split][scenario]
                logits = torch.cat(
                    [
                        model(
                            rows["categorical"][start : start + EVAL_CHUNK],
                            rows["numerical"][start : start + EVAL_CHUNK],
                            members,
                        )
                        for start in range(0, self._length(rows), EVAL_CHUNK)
                    ]
                )
                for k, task in enumerate(members):
                    label = rows[self._split_task(task)[1]]
                    loss = F.binary_cross_entropy_with_logits(logits[:, k], label)
                    results[task] = {"auc": auc(logits[:, k], label), "loss": loss.item()}
        return {task: results[task] for task in names}

    def split_sizes(self) -> dict[str, dict[str, int]]:
        """Rows per scenario and split."""
        return {
            scenario: {split: self._length(self._rows[split][scenario]) for split in self._rows}
            for scenario in self.scenarios
        }

    def describe(self) -> dict[str, object]:
        description: dict[str, object] = {
            "benchmark": self.name,
            "target": self.target,
            "batch_size": self.batch_size,
            **self.options,
        }
        for scenario, sizes in self.split_sizes().items():
            for split, size in sizes.items():
                description[f"{scenario}_{split}"] = size
        return description
