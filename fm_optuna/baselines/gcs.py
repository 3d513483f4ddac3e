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

from fm_optuna.baselines._jacobian import JacobianRule
from fm_optuna.baselines.base import Baseline
from fm_optuna.errors import invalid

if TYPE_CHECKING:
    from fm_optuna.core._training import UpdateRule
    from fm_optuna.problem._tasks import Problem


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
        from fm_optuna.baselines._cosine_gate import CosineGate  # torchjd: see _jacobian

        tasks = (problem.target, *problem.auxiliaries)
        return JacobianRule(problem, CosineGate(weighted=self.weighted), tasks)
