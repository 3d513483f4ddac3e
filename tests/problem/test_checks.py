"""check_problem: each mistake a new user makes is one line before any training."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
from torch import nn

from fm_optuna.errors import ConfigError, ProblemWarning
from fm_optuna.problem._checks import check_problem
from fm_optuna.problem._tasks import Task, describe_problem
from tests.conftest import ToyProblem


class WrongTarget(ToyProblem):
    def __init__(self) -> None:
        super().__init__()
        self.target = "progression"


class MetricMissing(ToyProblem):
    def __init__(self) -> None:
        super().__init__()
        self.tasks = (Task("t0", metric="mae", higher_is_better=False), *self.tasks[1:])


class LossesMissingATask(ToyProblem):
    def task_losses(
        self, model: nn.Module, tasks: Sequence[str], generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        return super().task_losses(model, [t for t in tasks if t != "t2"], generator)


class NanLoss(ToyProblem):
    def task_losses(
        self, model: nn.Module, tasks: Sequence[str], generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        losses = super().task_losses(model, tasks, generator)
        return {**losses, "t1": losses["t1"] * float("nan")}


class VectorLoss(ToyProblem):
    def task_losses(
        self, model: nn.Module, tasks: Sequence[str], generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        losses = super().task_losses(model, tasks, generator)
        return {**losses, "t0": losses["t0"].repeat(3)}


class DetachedLoss(ToyProblem):
    def task_losses(
        self, model: nn.Module, tasks: Sequence[str], generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in super().task_losses(model, tasks, generator).items()}


class TowerNet(nn.Module):
    def __init__(self, tasks: Sequence[str]) -> None:
        super().__init__()
        self.trunk = nn.Linear(6, 16)
        self.towers = nn.ModuleDict({task: nn.Linear(16, 1) for task in tasks})

    def forward(self, x: torch.Tensor, task: str) -> torch.Tensor:
        return self.towers[task](torch.tanh(self.trunk(x))).squeeze(-1)


class NoHeadsPrefix(ToyProblem):
    """The user's heads live in `towers`, so the default shared_parameters takes everything."""

    def make_model(self) -> nn.Module:
        return TowerNet(self.task_names)


class NoBenchmarkKey(ToyProblem):
    def describe(self) -> dict[str, object]:
        return {"width": 16}


def test_a_good_problem_passes_and_leaves_the_random_state_alone() -> None:
    before = torch.get_rng_state()
    check_problem(ToyProblem())
    assert torch.equal(before, torch.get_rng_state())


@pytest.mark.parametrize(
    ("problem", "message"),
    [
        (
            WrongTarget(),
            "Problem `toy`: the target should be one of its tasks (t0, t1, t2, t3). "
            "Found `target = progression`.",
        ),
        (
            MetricMissing(),
            'Problem `toy`: task `t0`: evaluate(model, "val") should return its primary metric '
            "`mae` (Task.metric). Found mse.",
        ),
        (
            LossesMissingATask(),
            "Problem `toy`: task `t2`: task_losses(model, ['t0', 't1', 't2', 't3'], generator) "
            "should return a scalar tensor for it. Found no entry.",
        ),
        (NanLoss(), "task `t1`: task_losses(model, ['t0', 't1', 't2', 't3'], generator) should"),
        (VectorLoss(), "should return a scalar loss. Found shape (3,)."),
        (DetachedLoss(), "a loss computed from the model's parameters (it does not require grad"),
    ],
)
def test_each_broken_rule_is_one_line_naming_problem_and_task(
    problem: ToyProblem, message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        check_problem(problem)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_nan_loss_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"task `t1`.*a finite loss\. Found nan"):
        check_problem(NanLoss())


def test_heads_outside_heads_prefix_warn_that_baselines_treat_them_as_trunk() -> None:
    with pytest.warns(ProblemWarning, match="treat the task heads as trunk"):
        check_problem(NoHeadsPrefix())


def test_shared_parameters_must_be_a_nonempty_subset() -> None:
    class Empty(ToyProblem):
        def shared_parameters(self, model: nn.Module) -> list[nn.Parameter]:
            return []

    class Foreign(ToyProblem):
        def shared_parameters(self, model: nn.Module) -> list[nn.Parameter]:
            return [nn.Parameter(torch.zeros(1))]

    with pytest.raises(ConfigError, match=r"shared_parameters.*Found none"):
        check_problem(Empty())
    with pytest.raises(ConfigError, match=r"trainable parameters of that model\. Found 1"):
        check_problem(Foreign())


def test_describe_needs_no_benchmark_key_but_must_be_a_mapping() -> None:
    problem = NoBenchmarkKey()
    check_problem(problem)
    assert describe_problem(problem) == {"benchmark": "toy", "target": "t0", "width": 16}

    class NotAMapping(ToyProblem):
        def describe(self) -> dict[str, object]:
            return ["toy"]  # type: ignore[return-value]

    with pytest.raises(ConfigError, match=r"describe\(\) should return a flat dict"):
        check_problem(NotAMapping())


def test_unset_attributes_are_named() -> None:
    class Nameless(ToyProblem):
        name = ""

    class Untasked(ToyProblem):
        def __init__(self) -> None:
            super().__init__()
            self.tasks = ("t0", "t1")  # type: ignore[assignment]

    with pytest.raises(ConfigError, match=r"`name` should be set to a non-empty string"):
        check_problem(Nameless())
    with pytest.raises(ConfigError, match=r"`tasks` should be a non-empty tuple of Task"):
        check_problem(Untasked())
