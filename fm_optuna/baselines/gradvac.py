"""GradVac (Wang et al., 2021): steer pairwise gradient similarities towards their running EMA.

torchjd's stateful ``GradVac`` aggregator on the shared parameters (one fresh instance per run).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from fm_optuna.baselines._jacobian import GradientBaseline
from fm_optuna.errors import invalid

if TYPE_CHECKING:
    from torchjd.aggregation import Aggregator


@dataclass(frozen=True)
class GradVaccine(GradientBaseline):
    """Options: ``beta``, the EMA rate of the target similarities (torchjd's and LibMTL's 0.5)."""

    name: ClassVar[str] = "gradvac"
    reference: ClassVar[str] = "Wang et al., 2021"
    beta: float = 0.5

    def __post_init__(self) -> None:
        if not 0 < self.beta <= 1:
            raise invalid("beta", self.beta, "a number in (0, 1]")

    def aggregator(self, n_tasks: int) -> Aggregator:
        from torchjd.aggregation import GradVac  # see _jacobian: loaded on use

        return GradVac(beta=self.beta)
