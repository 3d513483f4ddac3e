"""MGDA (Sener & Koltun, 2018): the min-norm point of the convex hull of the task gradients.

torchjd's ``MGDA`` aggregator (Frank-Wolfe on the Gramian) on the shared parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from fm_optuna.baselines._jacobian import GradientBaseline
from fm_optuna.errors import invalid

if TYPE_CHECKING:
    from torchjd.aggregation import Aggregator


@dataclass(frozen=True)
class Mgda(GradientBaseline):
    """Options: ``epsilon`` (Frank-Wolfe stopping tolerance), ``max_iters``."""

    name: ClassVar[str] = "mgda"
    reference: ClassVar[str] = "Sener & Koltun, 2018"
    epsilon: float = 0.001
    max_iters: int = 100

    def __post_init__(self) -> None:
        if not self.epsilon > 0:
            raise invalid("epsilon", self.epsilon, "a positive number")
        if not isinstance(self.max_iters, int) or self.max_iters < 1:
            raise invalid("max_iters", self.max_iters, "a positive integer")

    def aggregator(self, n_tasks: int) -> Aggregator:
        from torchjd.aggregation import MGDA  # see _jacobian: loaded on use

        return MGDA(epsilon=self.epsilon, max_iters=self.max_iters)
