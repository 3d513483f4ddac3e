"""PTFT: pre-train on all tasks (EW), then fine-tune on the target alone (Liu et al., 2019c).

The budget is T optimizer steps like every other method: the first ``round(fraction · T)``
steps pre-train with Σ_k L_k, the rest fine-tune with L_target only. In the fine-tuning phase the
auxiliary heads get no gradient (Adam skips them), so they keep their pre-trained values; Adam's
moments carry over from pre-training (one optimizer for the whole run, as a continued run).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from fm_optuna.baselines.base import Baseline
from fm_optuna.core._training import WeightedSum
from fm_optuna.errors import invalid

if TYPE_CHECKING:
    import torch
    from torch import nn

    from fm_optuna.config import ForkMergeConfig
    from fm_optuna.core._training import UpdateRule
    from fm_optuna.problem._tasks import Problem


class PretrainFinetuneRule:
    """EW up to step ``switch_step`` (inclusive), target only afterwards."""

    def __init__(self, problem: Problem, switch_step: int) -> None:
        self.switch_step = switch_step
        self._pretrain = WeightedSum(dict.fromkeys(problem.task_names, 1.0))
        self._finetune = WeightedSum({problem.target: 1.0})
        self._current = self._pretrain

    @property
    def phase(self) -> str:
        return "pretrain" if self._current is self._pretrain else "finetune"

    @property
    def tasks(self) -> tuple[str, ...]:
        return self._current.tasks

    def begin_step(self, step: int) -> None:
        self._current = self._pretrain if step <= self.switch_step else self._finetune

    def backward(self, losses: Mapping[str, torch.Tensor], model: nn.Module) -> None:
        self._current.backward(losses, model)


@dataclass(frozen=True)
class PretrainFinetune(Baseline):
    """Options: ``fraction`` of T spent pre-training (default half), or ``pretrain_steps``."""

    name: ClassVar[str] = "ptft"
    reference: ClassVar[str] = "Liu et al., 2019"
    kind: ClassVar[str] = "target-specific"
    fraction: float = 0.5
    pretrain_steps: int | None = None  # overrides ``fraction`` when given

    def __post_init__(self) -> None:
        if not 0 <= self.fraction <= 1:
            raise invalid("fraction", self.fraction, "a number in [0, 1]")
        if self.pretrain_steps is not None and (
            not isinstance(self.pretrain_steps, int) or self.pretrain_steps < 0
        ):
            raise invalid("pretrain_steps", self.pretrain_steps, "a non-negative integer")

    def switch_step(self, total_steps: int) -> int:
        if self.pretrain_steps is not None:
            return min(self.pretrain_steps, total_steps)
        return round(self.fraction * total_steps)

    def rule(self, problem: Problem) -> UpdateRule:
        if self.pretrain_steps is None:
            raise invalid(
                "pretrain_steps", None, "an integer when no budget is known (use rule_for)"
            )
        return PretrainFinetuneRule(problem, self.pretrain_steps)

    def rule_for(self, problem: Problem, config: ForkMergeConfig) -> UpdateRule:
        return PretrainFinetuneRule(problem, self.switch_step(config.total_steps))
