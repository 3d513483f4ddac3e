"""GradNorm (Chen et al., 2018): task weights learnt to equalise the tasks' relative training rates.

The model's gradient is that of Σ_k w_k L_k. The weights w (initialised to 1) are the rule's own
learnable tensor, optimised by the run's optimizer (like UW's log-variances) on

    L_grad = Σ_k | G_k − Ḡ · r_k^α |,   G_k = ‖∇_W w_k L_k‖,   r_k = L̃_k / mean_j L̃_j,

with L̃_k = L_k(t) / L_k(0) the inverse training rate (L_k(0): the losses of the run's first step),
Ḡ the mean of the G_k and the target Ḡ r_k^α held constant. W is the last shared layer's weight,
as in the paper: by default the last shared parameter with two or more dimensions (a linear or
convolution weight; ``layer`` names another). A task that trains faster than the others (r_k < 1)
gets a smaller gradient-norm target, so its weight falls; the asymmetry α sets how strongly rates
are pulled together (paper: 1.5 on NYUv2; α = 0 only equalises gradient norms). After every
update the weights are renormalised to Σ_k w_k = K.

The norms cost one extra backward per task from the loss down to W only (the heads and W), on top
of the one backward of Σ_k w_k L_k. Deviation: a weight is floored at 1e-4 before renormalising
(the paper does not say what to do when a step pushes one below zero).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from fm_optuna.baselines.base import Baseline
from fm_optuna.errors import check_finite, invalid, one_of

if TYPE_CHECKING:
    from torch import nn

    from fm_optuna.core._training import UpdateRule
    from fm_optuna.problem._tasks import Problem

_FLOOR = 1e-4


def last_shared_layer(problem: Problem, model: nn.Module, name: str | None = None) -> str:
    """The name of W: ``name`` (checked), else the last shared parameter with ndim ≥ 2 (else the
    last shared parameter)."""
    ids = {id(p) for p in problem.shared_parameters(model)}
    shared = [(n, p) for n, p in model.named_parameters() if id(p) in ids]
    if name is not None:
        if name not in dict(shared):
            raise one_of("layer", name, dict(shared))
        return name
    if not shared:
        raise invalid("shared_parameters", "[]", "at least one shared parameter for GradNorm")
    matrices = [n for n, p in shared if p.dim() >= 2]
    return matrices[-1] if matrices else shared[-1][0]


class GradNormRule:
    def __init__(self, problem: Problem, *, alpha: float, layer: str | None) -> None:
        self.problem = problem
        self.tasks: tuple[str, ...] = problem.task_names
        self.alpha, self.layer = alpha, layer
        self.weights = torch.ones(len(self.tasks), device=problem.device, requires_grad=True)
        self.initial: torch.Tensor | None = None  # L_k(0)
        self._layer_name: str | None = None

    @property
    def task_weights(self) -> dict[str, float]:
        """The current weights, renormalised to sum to K as the next step will use them."""
        values = self._normalised(self.weights.detach()).tolist()
        return dict(zip(self.tasks, values, strict=True))

    def learnable_parameters(self) -> list[torch.Tensor]:
        return [self.weights]

    def _normalised(self, weights: torch.Tensor) -> torch.Tensor:
        weights = weights.clamp(min=_FLOOR)
        return weights * (len(self.tasks) / weights.sum())

    def backward(self, losses: Mapping[str, torch.Tensor], model: nn.Module) -> None:
        with torch.no_grad():
            self.weights.copy_(self._normalised(self.weights))  # after the last optimizer step
        if self._layer_name is None:
            self._layer_name = last_shared_layer(self.problem, model, self.layer)
        layer = dict(model.named_parameters())[self._layer_name]
        values = torch.stack([losses[task] for task in self.tasks])
        norms = []
        for task in self.tasks:
            (grad,) = torch.autograd.grad(
                losses[task], [layer], retain_graph=True, allow_unused=True
            )
            norms.append(torch.zeros((), device=layer.device) if grad is None else grad.norm())
        current = values.detach().float()
        if self.initial is None:
            self.initial = current.clone()
        ratios = current / self.initial
        rates = ratios / ratios.mean()
        gradient_norms = self.weights * torch.stack(norms).float()
        target = (gradient_norms.mean() * rates**self.alpha).detach()
        (weights_grad,) = torch.autograd.grad((gradient_norms - target).abs().sum(), [self.weights])
        (self.weights.detach().to(values.dtype) * values).sum().backward()
        self.weights.grad = weights_grad


@dataclass(frozen=True)
class GradNorm(Baseline):
    """Options: ``alpha`` (asymmetry, paper: 1.5), ``layer`` (the name of the shared parameter
    whose gradient norms are balanced; default: the last shared layer's weight)."""

    name: ClassVar[str] = "gradnorm"
    reference: ClassVar[str] = "Chen et al., 2018"
    alpha: float = 1.5
    layer: str | None = None

    def __post_init__(self) -> None:
        if check_finite("alpha", self.alpha, "a non-negative number") < 0:
            raise invalid("alpha", self.alpha, "a non-negative number")
        if self.layer is not None and not isinstance(self.layer, str):
            raise invalid("layer", self.layer, "a parameter name, e.g. trunk.8.weight")

    def rule(self, problem: Problem) -> UpdateRule:
        return GradNormRule(problem, alpha=self.alpha, layer=self.layer)
