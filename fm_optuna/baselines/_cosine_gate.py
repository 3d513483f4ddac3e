"""GCS's aggregator, apart from :mod:`fm_optuna.baselines.gcs` because it subclasses torchjd's
``Aggregator`` and so loads torchjd (and cvxpy) when imported: the registry loads gcs, not this."""

from __future__ import annotations

import torch
from torchjd.aggregation import Aggregator


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
