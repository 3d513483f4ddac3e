"""CAGrad (Liu et al., 2021): the best worst-case improvement in a ball around the mean gradient.

torchjd's ``CAGrad`` aggregator on the shared parameters; needs cvxpy with the Clarabel solver.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from fm_optuna.baselines._jacobian import GradientBaseline
from fm_optuna.errors import invalid

if TYPE_CHECKING:
    from torchjd.aggregation import Aggregator


@dataclass(frozen=True)
class CaGrad(GradientBaseline):
    """Options: ``c``, the radius of the ball in units of the mean gradient's norm (paper: 0.4)."""

    name: ClassVar[str] = "cagrad"
    reference: ClassVar[str] = "Liu et al., 2021"
    c: float = 0.4

    def __post_init__(self) -> None:
        if not self.c >= 0:
            raise invalid("c", self.c, "a non-negative number")

    def aggregator(self, n_tasks: int) -> Aggregator:
        from torchjd.aggregation import CAGrad  # see _jacobian: loaded on use

        return CAGrad(c=self.c)
