"""RLW: random loss weighting (Lin et al., 2022, Algorithm 2).

Each step the loss is Σ_k λ_k L_k with λ = softmax(z), z ~ N(0, I_K): positive weights summing to
one. torchjd's ``Random`` scalarizer draws z from torch's global generator; this rule draws it from
its own generator seeded by the run's seed, so the weights are reproducible and leave the data
order and every other random draw untouched.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from fm_optuna.baselines.base import Baseline

if TYPE_CHECKING:
    from torch import nn

    from fm_optuna.config import ForkMergeConfig
    from fm_optuna.core._training import UpdateRule
    from fm_optuna.problem._tasks import Problem

_STREAM = 40_009  # keeps RLW's draws apart from any data stream of the same seed


class RandomWeightRule:
    def __init__(self, problem: Problem, seed: int) -> None:
        self.tasks: tuple[str, ...] = problem.task_names
        self.generator = torch.Generator().manual_seed(seed * 1_000_003 + _STREAM)
        self.last_weights: dict[str, float] = {}

    def draw(self) -> torch.Tensor:
        return torch.softmax(torch.randn(len(self.tasks), generator=self.generator), dim=0)

    def backward(self, losses: Mapping[str, torch.Tensor], model: nn.Module) -> None:
        weights = self.draw()
        self.last_weights = dict(zip(self.tasks, weights.tolist(), strict=True))
        stacked = torch.stack([losses[task] for task in self.tasks])
        (weights.to(stacked.device, stacked.dtype) * stacked).sum().backward()


@dataclass(frozen=True)
class RandomLossWeighting(Baseline):
    name: ClassVar[str] = "rlw"
    reference: ClassVar[str] = "Lin et al., 2022"

    def rule(self, problem: Problem) -> UpdateRule:
        return RandomWeightRule(problem, seed=0)

    def rule_for(self, problem: Problem, config: ForkMergeConfig) -> UpdateRule:
        return RandomWeightRule(problem, seed=config.seed)
