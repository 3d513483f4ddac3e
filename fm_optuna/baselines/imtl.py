"""IMTL-G (Liu et al., 2021): the update whose projections on every unit task gradient are equal.

torchjd's ``IMTLG`` aggregator on the shared parameters. The paper's tables report "IMTL", the
hybrid of IMTL-G with IMTL-L's learnt loss scales; IMTL-G's direction is invariant to rescaling a
task's gradient, so IMTL-L would only rescale the head gradients and is left out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from fm_optuna.baselines._jacobian import GradientBaseline

if TYPE_CHECKING:
    from torchjd.aggregation import Aggregator


@dataclass(frozen=True)
class ImtlG(GradientBaseline):
    name: ClassVar[str] = "imtl"
    reference: ClassVar[str] = "Liu et al., 2021 (IMTL-G)"

    def aggregator(self, n_tasks: int) -> Aggregator:
        from torchjd.aggregation import IMTLG  # see _jacobian: loaded on use

        return IMTLG()
