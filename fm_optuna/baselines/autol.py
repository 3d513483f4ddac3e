"""Auto-λ (Liu et al., 2022): task weights meta-learnt by a one-step lookahead on the target.

Each step, before the model's update: with the per-task gradients g_k at θ and the current
weights λ, a virtual SGD step θ' = θ − α Σ_k λ_k g_k (α = the run's learning rate; the official
code's virtual step is also plain SGD when the optimizer is Adam, which keeps no momentum buffer)
is scored by the target's loss on a *fresh* batch. Its gradient with respect to λ_k is exactly
−α ⟨∇L_target(θ'), g_k⟩ — the quantity the official code estimates by finite differences — and
λ takes one Adam step on it. Then the model's gradient is Σ_k λ_k g_k with the new λ. All
parameters (shared and heads) take part, as in the official code; λ is not clipped.

Deviation: the official meta batch comes from a held-out loader. The Problem seam gives
differentiable losses on training batches only, so the meta batch is a fresh *training* batch of
the target drawn from the rule's own generator (the data order of the step is unchanged).
Defaults are the official ones for NYUv2 (λ₀ = 0.1, meta learning rate 1e-4); with Adam updating
the model, λ's overall scale does not matter, only the ratios do.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from fm_optuna.baselines.base import Baseline
from fm_optuna.core._training import data_generator
from fm_optuna.errors import invalid

if TYPE_CHECKING:
    from torch import nn

    from fm_optuna.config import ForkMergeConfig
    from fm_optuna.core._training import UpdateRule
    from fm_optuna.problem._tasks import Problem

_STREAM = 50_021  # the meta batches' stream, apart from every data stream of the same seed


def _flat_grads(loss: torch.Tensor, params: list[nn.Parameter], retain: bool) -> torch.Tensor:
    grads = torch.autograd.grad(loss, params, retain_graph=retain, allow_unused=True)
    return torch.cat(
        [
            (torch.zeros_like(p) if g is None else g).reshape(-1)
            for g, p in zip(grads, params, strict=True)
        ]
    )


class AutoLambdaRule:
    def __init__(
        self, problem: Problem, *, lr: float, init: float, meta_lr: float, seed: int
    ) -> None:
        self.problem = problem
        self.tasks: tuple[str, ...] = problem.task_names
        self.lr = lr
        self.weights = torch.full((len(self.tasks),), init, device=problem.device)
        self.weights.requires_grad_(True)
        self.meta_optimizer = torch.optim.Adam([self.weights], lr=meta_lr)
        self.generator = data_generator(problem, seed, _STREAM)

    def backward(self, losses: Mapping[str, torch.Tensor], model: nn.Module) -> None:
        params = [p for p in model.parameters() if p.requires_grad]
        last = len(self.tasks) - 1
        jacobian = torch.stack(
            [_flat_grads(losses[t], params, i < last) for i, t in enumerate(self.tasks)]
        )
        self._meta_step(model, params, jacobian)
        combined = self.weights.detach() @ jacobian
        offset = 0
        for p in params:
            p.grad = combined[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()

    def _meta_step(
        self, model: nn.Module, params: list[nn.Parameter], jacobian: torch.Tensor
    ) -> None:
        saved = [p.detach().clone() for p in params]
        buffers = [b.detach().clone() for b in model.buffers()]  # BatchNorm statistics
        step = self.lr * (self.weights.detach() @ jacobian)
        with torch.no_grad():
            offset = 0
            for p in params:
                p.sub_(step[offset : offset + p.numel()].view_as(p))
                offset += p.numel()
        target = self.problem.target
        meta_loss = self.problem.task_losses(model, [target], self.generator)[target]
        lookahead = _flat_grads(meta_loss, params, retain=False)
        with torch.no_grad():
            for p, value in zip(params, saved, strict=True):
                p.copy_(value)
            for b, value in zip(model.buffers(), buffers, strict=True):
                b.copy_(value)
        self.meta_optimizer.zero_grad(set_to_none=True)
        self.weights.grad = -self.lr * (jacobian @ lookahead)
        self.meta_optimizer.step()


@dataclass(frozen=True)
class AutoLambda(Baseline):
    """Options: ``init`` (λ₀ of every task), ``meta_lr`` (Adam learning rate of λ)."""

    name: ClassVar[str] = "autol"
    reference: ClassVar[str] = "Liu et al., 2022"
    kind: ClassVar[str] = "target-specific"
    init: float = 0.1
    meta_lr: float = 1e-4

    def __post_init__(self) -> None:
        if not self.init > 0:
            raise invalid("init", self.init, "a positive number")
        if not self.meta_lr > 0:
            raise invalid("meta_lr", self.meta_lr, "a positive number")

    def rule(self, problem: Problem) -> UpdateRule:
        return AutoLambdaRule(problem, lr=1e-3, init=self.init, meta_lr=self.meta_lr, seed=0)

    def rule_for(self, problem: Problem, config: ForkMergeConfig) -> UpdateRule:
        return AutoLambdaRule(
            problem, lr=config.lr, init=self.init, meta_lr=self.meta_lr, seed=config.seed
        )
