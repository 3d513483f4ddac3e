"""SI and GradNorm: the gradients they give and where GradNorm's weights go."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import pytest
import torch
from torch import nn

from fm_optuna.baselines import GradNorm, ScaleInvariant, make_baseline, run_baseline
from fm_optuna.baselines.gradnorm import GradNormRule, last_shared_layer
from fm_optuna.config import ForkMergeConfig
from fm_optuna.errors import ConfigError
from fm_optuna.problem._tasks import Problem, Split, Task, TaskMetrics
from tests.conftest import ToyProblem


def test_si_gives_each_task_gradient_divided_by_its_loss() -> None:
    problem = ToyProblem(n_tasks=2)
    rule = ScaleInvariant().rule(problem)
    leaves = [torch.tensor(v, requires_grad=True) for v in (0.5, 4.0)]
    rule.backward(dict(zip(problem.task_names, leaves, strict=True)), nn.Module())
    assert [leaf.grad.item() for leaf in leaves] == pytest.approx([2.0, 0.25])  # type: ignore[union-attr]


class _TwoOutputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Linear(1, 2, bias=False)  # W, the last (only) shared layer
        nn.init.zeros_(self.trunk.weight)
        self.heads = nn.ModuleDict()


class _OneFastTask(Problem):
    """L_k = s_k (o_k − 1)² on separate outputs o = W·1: ``fast`` has 16× the curvature, so under
    SGD its loss falls much faster relative to where it started than ``slow``'s."""

    name = "rates"
    scales: ClassVar[dict[str, float]] = {"fast": 4.0, "slow": 0.25}

    def __init__(self) -> None:
        self.tasks = tuple(Task(t, metric="mse", higher_is_better=False) for t in self.scales)
        self.target = "slow"
        self.device = torch.device("cpu")

    def make_model(self) -> nn.Module:
        return _TwoOutputs()

    def task_losses(
        self, model: nn.Module, tasks: Sequence[str], generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        out = model.trunk(torch.ones(1, 1))[0]
        return {
            t: self.scales[t] * (out[i] - 1) ** 2 for i, t in enumerate(self.scales) if t in tasks
        }

    def evaluate(
        self, model: nn.Module, split: Split, tasks: Sequence[str] | None = None
    ) -> dict[str, TaskMetrics]:
        with torch.no_grad():
            losses = self.task_losses(model, tasks or self.task_names, torch.Generator())
        return {t: {"mse": float(v)} for t, v in losses.items()}


def test_gradnorm_weights_move_toward_equal_relative_training_rates() -> None:
    problem = _OneFastTask()
    config = ForkMergeConfig(dt=20, total_steps=20, lr=0.02, optimizer="sgd", momentum=0.0)

    def rate_gap(model: nn.Module) -> float:
        """|log(L̃_fast / L̃_slow)|, L̃_k = L_k(t) / L_k(0) (L_k(0) = s_k at W = 0)."""
        losses = problem.evaluate(model, "val")
        fast, slow = (losses[t]["mse"] / problem.scales[t] for t in ("fast", "slow"))
        return abs(math.log(fast / slow))

    result = run_baseline(GradNorm(alpha=1.5), problem, config)
    assert isinstance(result.rule, GradNormRule)
    weights = result.rule.task_weights
    assert sum(weights.values()) == pytest.approx(2.0)
    assert weights["fast"] < 0.5 < 1.5 < weights["slow"]
    equal = run_baseline(make_baseline("ew"), problem, config).model
    assert rate_gap(result.model) < 0.5 * rate_gap(equal)


def test_gradnorm_balances_the_last_shared_layer_and_checks_its_options() -> None:
    problem = ToyProblem()  # trunk: Linear, BatchNorm1d, Tanh
    assert last_shared_layer(problem, problem.make_model()) == "trunk.0.weight"
    from fm_optuna.benchmarks import build_problem

    digits = build_problem("digits", target="uci", batch_size=8)
    model = digits.make_model()
    name = last_shared_layer(digits, model)
    linear = [
        n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("trunk")
    ]
    assert name == f"{linear[-1]}.weight"
    with pytest.raises(ConfigError, match="Parameter `layer` should be one of"):
        last_shared_layer(problem, problem.make_model(), "heads.t0.weight")
    with pytest.raises(ConfigError, match="Parameter `alpha`"):
        GradNorm(alpha=-1)
