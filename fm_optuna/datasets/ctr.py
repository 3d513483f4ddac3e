"""Click/conversion models and the AUC, shared by the MovieLens benchmark and the AliExpress loader.

The model follows MTReclib's shared-bottom (the library behind the paper's AliExpress numbers):
one embedding per categorical field, the numerical features projected to one more embedding, an
MLP bottom shared by all tasks and one MLP tower per task. ``esmm`` pairs turn it into ESMM
(Ma et al., 2018): a conversion task's probability is ``p(click) × p(conversion | click)``, the
product of its scenario's click tower and its own tower, so it is trained on every impression
without a selection bias.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["SharedBottom", "auc"]


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve from ranks (Mann–Whitney U), ties counted as one half.

    Args:
        scores: ``[n]`` predicted scores (any monotone transform of a probability).
        labels: ``[n]`` binary labels.

    Returns:
        The AUC in [0, 1], or NaN when ``labels`` are all of one class.

    Example:
        >>> auc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1]))
        0.75
    """
    scores = scores.detach().flatten().double()
    positive = labels.detach().flatten().bool()
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = torch.argsort(scores)
    ordered = scores[order]
    # Tied scores share the mean of the ranks they span: ranks first+1 .. last+1 (1-based).
    _, inverse, counts = torch.unique_consecutive(ordered, return_inverse=True, return_counts=True)
    last = torch.cumsum(counts, 0).double()
    mean_rank = last - (counts.double() - 1) / 2
    ranks = torch.empty_like(scores)
    ranks[order] = mean_rank[inverse]
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def _mlp(sizes: Sequence[int]) -> nn.Sequential:
    """Linear → BatchNorm → ReLU per hidden layer, as in MTReclib (without its dropout, which
    would draw from the global RNG and break seeded batches' reproducibility)."""
    layers: list[nn.Module] = []
    for fan_in, fan_out in itertools.pairwise(sizes):
        layers += [nn.Linear(fan_in, fan_out), nn.BatchNorm1d(fan_out), nn.ReLU()]
    return nn.Sequential(*layers)


class SharedBottom(nn.Module):
    """Shared embeddings and bottom MLP, one tower per task; optionally ESMM for conversions.

    Args:
        field_dims: Number of values of each categorical field (indices ``0 .. dim - 1``).
        numerical: Number of numerical features (0 for none).
        tasks: Task names, one tower each.
        embed_dim: Embedding size per field.
        bottom: Hidden sizes of the shared MLP.
        tower: Hidden sizes of each task's MLP before its output unit.
        esmm: Conversion task → click task of the same scenario; those conversion tasks predict
            ``p(click) × p(conversion | click)``.

    ``forward`` returns logits ``[batch, len(tasks)]``; for ESMM tasks the logit of the product.
    """

    def __init__(
        self,
        field_dims: Sequence[int],
        numerical: int,
        tasks: Sequence[str],
        *,
        embed_dim: int = 16,
        bottom: Sequence[int] = (128, 64),
        tower: Sequence[int] = (32,),
        esmm: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__()
        self.esmm = dict(esmm or {})
        for conversion, click in self.esmm.items():
            if conversion not in tasks or click not in tasks:
                raise ValueError(f"ESMM pair {conversion} → {click} names an unknown task")
        offsets = torch.tensor([0, *list(field_dims)[:-1]]).cumsum(0)
        self.register_buffer("offsets", offsets, persistent=False)
        # One table for all fields (MTReclib's layout): one lookup per batch, not one per field.
        self.embedding = nn.Embedding(int(sum(field_dims)), embed_dim)
        self.numerical = nn.Linear(numerical, embed_dim) if numerical else None
        width = (len(field_dims) + (1 if numerical else 0)) * embed_dim
        self.bottom = _mlp([width, *bottom])
        self.towers = nn.ModuleDict(
            {
                task: nn.Sequential(_mlp([bottom[-1], *tower]), nn.Linear(tower[-1], 1))
                for task in tasks
            }
        )

    def features(self, categorical: torch.Tensor, numerical: torch.Tensor | None) -> torch.Tensor:
        """The shared bottom's output, ``[batch, bottom[-1]]``."""
        fields = self.embedding(categorical + self.offsets)  # [batch, fields, embed]
        parts = [fields.flatten(1)]
        if self.numerical is not None and numerical is not None:
            parts.append(self.numerical(numerical))
        return self.bottom(torch.cat(parts, dim=1))

    def forward(
        self, categorical: torch.Tensor, numerical: torch.Tensor | None, tasks: Sequence[str]
    ) -> torch.Tensor:
        z = self.features(categorical, numerical)
        logits: dict[str, torch.Tensor] = {}
        needed = set(tasks) | {self.esmm[t] for t in tasks if t in self.esmm}
        for task in needed:
            logits[task] = self.towers[task](z).squeeze(1)
        out = []
        for task in tasks:
            if task in self.esmm:
                # log p = log σ(click) + log σ(cvr); logit = log p − log(1 − p), kept finite.
                log_p = F.logsigmoid(logits[self.esmm[task]]) + F.logsigmoid(logits[task])
                log_not_p = torch.log((-torch.expm1(log_p)).clamp(min=1e-7))
                out.append(log_p - log_not_p)
            else:
                out.append(logits[task])
        return torch.stack(out, dim=1)
