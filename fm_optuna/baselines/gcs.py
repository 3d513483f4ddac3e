"""GCS: gradient cosine similarity (Du et al., 2018), for a target and its auxiliaries.

On the shared parameters the update is g_target + Σ_aux [cos(g_target, g_aux) > 0] · g_aux: an
auxiliary gradient is added only when it points the same way as the target's (``weighted=True``
uses the paper's weighted variant, max(0, cos) · g_aux). The heads get their own task's gradient.
It is a torchjd aggregator over the Jacobian rows (target first), so it shares the plumbing of
the gradient methods.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torchjd.aggregation import Aggregator

from fm_optuna.baselines._jacobian import JacobianRule
from fm_optuna.baselines.base import Baseline
from fm_optuna.errors import invalid

if TYPE_CHECKING:
    from fm_optuna.core._training import UpdateRule
    from fm_optuna.problem._tasks import Problem


class CosineGate(Aggregator):
    """Row 0 (the target) plus every other row gated by its cosine with row 0."""

    def __init__(self, *, weighted: bool = False) -> None:
        super().__init__()
        self.weighted = weighted

    def gates(self, matrix: torch.Tensor) -> torch.Tensor:
        """The factor of each auxiliary row (1/0, or max(0, cos) when weighted)."""
        cosines = torch.nn.functional.cosine_similarity(matrix[1:], matrix[:1], dim=1)
        return cosines.clamp(min=0) if self.weighted else (cosines > 0).to(matrix.dtype)

    def forward(self, matrix: torch.Tensor, /) -> torch.Tensor:
        return matrix[0] + self.gates(matrix) @ matrix[1:]


@dataclass(frozen=True)
class GradientCosineSimilarity(Baseline):
    """Options: ``weighted`` (scale by max(0, cos) instead of a 0/1 gate)."""

    name: ClassVar[str] = "gcs"
    reference: ClassVar[str] = "Du et al., 2018"
    kind: ClassVar[str] = "target-specific"
    weighted: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.weighted, bool):
            raise invalid("weighted", self.weighted, "true or false")

    def rule(self, problem: Problem) -> UpdateRule:
        tasks = (problem.target, *problem.auxiliaries)
        return JacobianRule(problem, CosineGate(weighted=self.weighted), tasks)
