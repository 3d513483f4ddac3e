"""PCGrad (Yu et al., 2020): project each task gradient off the others it conflicts with.

torchjd's ``PCGrad`` aggregator on the shared parameters (it has no options). Its random
projection order comes from torch's global generator, which ``run_baseline`` seeds with the run's
seed (through the model's initialisation), so a seed still fixes the run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from fm_optuna.baselines._jacobian import GradientBaseline

if TYPE_CHECKING:
    from torchjd.aggregation import Aggregator


@dataclass(frozen=True)
class PcGrad(GradientBaseline):
    name: ClassVar[str] = "pcgrad"
    reference: ClassVar[str] = "Yu et al., 2020"

    def aggregator(self, n_tasks: int) -> Aggregator:
        from torchjd.aggregation import PCGrad  # see _jacobian: loaded on use

        return PCGrad()
