"""DWA: dynamic weight average (Liu et al., 2019) with torchjd's ``DWA`` scalarizer.

λ_k(t) = K · softmax_k(w_k(t−1) / temperature), w_k(t−1) = L̄_k(t−1) / L̄_k(t−2), where L̄_k(t)
is task k's mean training loss over *round* t. The paper's rounds are epochs; we count optimizer
steps and tasks have datasets of different sizes, so a round here is ``window`` steps (default
Δt, ForkMerge's merge interval, so both methods see the same time scale). Weights are 1 during the
first two rounds.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from fm_optuna.baselines.base import Baseline
from fm_optuna.errors import invalid

if TYPE_CHECKING:
    from torch import nn

    from fm_optuna.config import ForkMergeConfig
    from fm_optuna.core._training import UpdateRule
    from fm_optuna.problem._tasks import Problem


class DynamicWeightRule:
    def __init__(self, problem: Problem, *, window: int, temperature: float) -> None:
        self.tasks: tuple[str, ...] = problem.task_names
        self.window = window
        from torchjd.scalarization import DWA  # see _jacobian: loaded on use

        self.scalarizer = DWA(temperature=temperature)

    def begin_step(self, step: int) -> None:
        if step > 1 and (step - 1) % self.window == 0:
            self.scalarizer.step()  # close the round that just ended

    def backward(self, losses: Mapping[str, torch.Tensor], model: nn.Module) -> None:
        self.scalarizer(torch.stack([losses[task] for task in self.tasks])).backward()


@dataclass(frozen=True)
class DynamicWeightAverage(Baseline):
    """Options: ``temperature`` (paper: 2), ``window`` steps per round (default: Δt)."""

    name: ClassVar[str] = "dwa"
    reference: ClassVar[str] = "Liu et al., 2019"
    temperature: float = 2.0
    window: int | None = None

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise invalid("temperature", self.temperature, "a positive number")
        if self.window is not None and (not isinstance(self.window, int) or self.window < 1):
            raise invalid("window", self.window, "a positive integer")

    def rule(self, problem: Problem) -> UpdateRule:
        if self.window is None:
            raise invalid("window", None, "an integer when no Δt is known (use rule_for)")
        return DynamicWeightRule(problem, window=self.window, temperature=self.temperature)

    def rule_for(self, problem: Problem, config: ForkMergeConfig) -> UpdateRule:
        return DynamicWeightRule(
            problem, window=self.window or config.dt, temperature=self.temperature
        )
