"""Nash-MTL (Navon et al., 2022): the Nash bargaining solution over the task gradients.

torchjd's stateful ``NashMTL`` aggregator on the shared parameters (one fresh instance per run);
needs cvxpy with the ECOS solver.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from fm_optuna.baselines._jacobian import GradientBaseline
from fm_optuna.errors import invalid

if TYPE_CHECKING:
    from torchjd.aggregation import Aggregator


@dataclass(frozen=True)
class NashMtl(GradientBaseline):
    """Options: ``max_norm`` (0 disables clipping), ``update_weights_every``, ``optim_niter``."""

    name: ClassVar[str] = "nashmtl"
    reference: ClassVar[str] = "Navon et al., 2022"
    max_norm: float = 1.0
    update_weights_every: int = 1
    optim_niter: int = 20

    def __post_init__(self) -> None:
        if not self.max_norm >= 0:
            raise invalid("max_norm", self.max_norm, "a non-negative number")
        for key in ("update_weights_every", "optim_niter"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise invalid(key, value, "a positive integer")

    def aggregator(self, n_tasks: int) -> Aggregator:
        from torchjd.aggregation import NashMTL  # see _jacobian: loaded on use

        return NashMTL(
            n_tasks=n_tasks,
            max_norm=self.max_norm,
            update_weights_every=self.update_weights_every,
            optim_niter=self.optim_niter,
        )
