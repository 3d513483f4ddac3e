"""IT-MTL (Fifty et al., 2021, Algorithm 1): each step, the candidate with the most transference.

Each step, from the per-task gradients g_k of the step's losses on the shared parameters θ_s:

1. every *candidate* gradient g_φ is built from rules that already exist here: ``ew`` (Σ_k g_k,
   EW's), ``mean`` (Σ_k g_k / K: EW at weights 1/K, the paper's 0.5/0.5 on MultiMNIST),
   ``pcgrad`` (torchjd's PCGrad of the g_k; likewise ``gradvac``, ``mgda``, ``imtl``, ``cagrad``
   with their baselines' default options), a task's name (g_task alone, its STL gradient) or
   ``tasks`` (every task alone);
2. the task-specific parameters (heads) take their usual update, Σ_k of their gradients;
3. each candidate is scored by Eq. 2, the total transference of its lookahead step on the *same*
   batches: Z_φ = Σ_j (1 − L_j(X_j, θ_s − Δ_φ, θ_j^{t+1}) / L_j(X_j, θ_s, θ_j^t)), with Δ_φ the
   step the run's optimizer would take with g_φ (Adam's from its current moments, as the paper
   does for its Adam-trained models; SGD's with its momentum; ``lookahead="sgd"``: η g_φ, as
   Algorithm 1 is written, which is also what a rule with no optimizer bound uses) and
   θ_j^{t+1} the heads after step 2 (Algorithm 1, line 8);
4. the argmax is applied to θ_s (ties: the first candidate listed).

``first_order=True`` is the approximation of Section 4.1 (‡ in the paper's tables): no lookahead
forward; Z_φ ≈ ⟨∇_θs Σ_j log L_j, Δ_φ⟩, the alignment of the candidate's step with the gradient of
the "log-product" loss, computed from the same g_k (∇ log L_j = g_j / L_j). With the SGD lookahead
Δ_φ = η g_φ, so it ranks candidates exactly as the paper's ⟨∇ Σ_j log L_j, g_φ⟩; with Adam it is
the first-order expansion of the very lookahead the exact variant evaluates.

``weighting="uw"`` multiplies every g_k by UW's weight ½ e^{−s_k} (Kendall et al., the paper's
"IT-UW-…" rows); the log-variances s_k are learnt as in ``uw``. The transference itself is scale
invariant, so it is always measured on the unweighted losses.

Registered presets: ``itmtl`` (each task alone and the sum: the paper's MultiMNIST IT-MTL),
``itmtl-fo`` (the same, first order), ``it-pcgrad`` (the sum and PCGrad: the paper's "-PCGrad"
set, used on NYUv2 and Cityscapes) and ``it-uw-pcgrad`` (that set, UW-weighted). Which candidate
won is counted per report window and sent as ``candidate/<name>/chosen`` (share of the window's
steps) and ``candidate/<name>/transference`` (mean score), logged as ``train/candidate/...``.

Cost per step: K backward passes for the per-task gradients (as the gradient baselines), plus,
for the exact variant, one forward of every task per candidate (on per-task batches, K forwards).

Deviation: our tasks draw separate batches, so X_j is task j's own batch of the step (replayed
exactly from the data generator, :class:`~fm_optuna.core._training.ReplayingRule`). BatchNorm
statistics touched by the lookahead forwards are restored; the lookahead ignores gradient clipping.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from fm_optuna.baselines._jacobian import GradientBaseline
from fm_optuna.baselines.base import Baseline
from fm_optuna.baselines.cagrad import CaGrad
from fm_optuna.baselines.gradvac import GradVaccine
from fm_optuna.baselines.imtl import ImtlG
from fm_optuna.baselines.mgda import Mgda
from fm_optuna.baselines.pcgrad import PcGrad
from fm_optuna.core._affinity import _adam_update
from fm_optuna.core._gradients import split_parameters, task_gradients
from fm_optuna.errors import invalid, one_of

if TYPE_CHECKING:
    from torch import nn
    from torchjd.aggregation import Aggregator

    from fm_optuna.config import ForkMergeConfig
    from fm_optuna.core._training import BatchReplay, UpdateRule
    from fm_optuna.problem._tasks import Problem

#: Candidates built by another baseline's aggregator over the (weighted) task gradients.
AGGREGATED: dict[str, type[GradientBaseline]] = {
    "pcgrad": PcGrad,
    "gradvac": GradVaccine,
    "mgda": Mgda,
    "imtl": ImtlG,
    "cagrad": CaGrad,
}
PLAIN = ("ew", "mean")  # torchjd's sum and mean of the (weighted) task gradients
EACH_TASK = "tasks"
LOOKAHEADS = ("optimizer", "sgd")
WEIGHTINGS = ("equal", "uw")


def _plain(name: str) -> Aggregator:
    from torchjd.aggregation import Mean, Sum  # see _jacobian: loaded on use

    return Sum() if name == "ew" else Mean()


def _uncertainty(n_tasks: int, device: torch.device) -> torch.nn.Module:
    from torchjd.scalarization import UW  # see _jacobian: loaded on use

    return UW(n_tasks).to(device)


def candidate_names(requested: Sequence[str], tasks: Sequence[str]) -> tuple[str, ...]:
    """``requested`` with ``tasks`` expanded to every task alone, checked and deduplicated.

    Example:
        >>> candidate_names(["ew", "tasks"], ["left", "right"])
        ('ew', 'left', 'right')
    """
    mechanisms = {*PLAIN, *AGGREGATED}
    for task in tasks:
        if task in mechanisms or task == EACH_TASK:
            raise invalid("task", task, "a name other than a candidate mechanism's")
    names: list[str] = []
    for name in requested:
        if name == EACH_TASK:
            names.extend(tasks)
        elif name in mechanisms or name in tasks:
            names.append(name)
        else:
            raise one_of("candidates", name, [*mechanisms, EACH_TASK, *tasks])
    return tuple(dict.fromkeys(names))


def _sgd_update(
    optimizer: torch.optim.Optimizer, params: Sequence[nn.Parameter], grads: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """The step torch's SGD would take with ``grads`` from its momentum buffers (not taken)."""
    group = optimizer.param_groups[0]
    lr, momentum = group["lr"], group.get("momentum", 0.0)
    dampening, decay = group.get("dampening", 0.0), group.get("weight_decay", 0.0)
    updates = []
    for p, g in zip(params, grads, strict=True):
        d = g + decay * p.detach() if decay else g
        if momentum:
            buffer = optimizer.state.get(p, {}).get("momentum_buffer")
            buffer = d if buffer is None else momentum * buffer + (1 - dampening) * d
            d = d + momentum * buffer if group.get("nesterov", False) else buffer
        updates.append(lr * d)
    return updates


def _views(flat: torch.Tensor, params: Sequence[nn.Parameter]) -> list[torch.Tensor]:
    parts = flat.split([p.numel() for p in params])
    return [part.view_as(p) for part, p in zip(parts, params, strict=True)]


class TransferenceRule:
    """Algorithm 1 on the problem's shared parameters; see the module docstring."""

    def __init__(
        self,
        problem: Problem,
        candidates: Sequence[str],
        *,
        first_order: bool,
        lookahead: str,
        weighting: str,
        lr: float,
    ) -> None:
        self.problem = problem
        self.tasks: tuple[str, ...] = problem.task_names
        self.candidates = candidate_names(candidates, self.tasks)
        self.first_order, self.lookahead, self.lr = first_order, lookahead, lr
        n = len(self.tasks)
        self.aggregators: dict[str, Aggregator] = {
            name: _plain(name) if name in PLAIN else AGGREGATED[name]().aggregator(n)
            for name in self.candidates
            if name not in self.tasks
        }
        self.scalarizer = _uncertainty(n, problem.device) if weighting == "uw" else None
        self.optimizer: torch.optim.Optimizer | None = None
        self._replay: BatchReplay | None = None
        self.wins: dict[str, int] = dict.fromkeys(self.candidates, 0)  # over the whole run
        self.last_scores: dict[str, float] = {}
        self._window_wins: dict[str, int] = dict.fromkeys(self.candidates, 0)
        self._window_scores: dict[str, float] = dict.fromkeys(self.candidates, 0.0)
        self._window_steps = 0

    # -- capabilities the loop and run_baseline call --------------------------------------------

    def bind_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        if self.lookahead == "optimizer" and not isinstance(
            optimizer, torch.optim.Adam | torch.optim.AdamW | torch.optim.SGD
        ):
            raise invalid("lookahead", self.lookahead, "sgd when the optimizer is not Adam or SGD")
        self.optimizer = optimizer

    def replay_batches(self, replay: BatchReplay) -> None:
        self._replay = replay

    def learnable_parameters(self) -> list[torch.Tensor]:
        return [] if self.scalarizer is None else list(self.scalarizer.parameters())

    def window_metrics(self) -> dict[str, float]:
        """Per candidate: the share of steps since the last call it won, and its mean score."""
        steps = max(self._window_steps, 1)
        metrics: dict[str, float] = {}
        for name in self.candidates:
            metrics[f"candidate/{name}/chosen"] = self._window_wins[name] / steps
            metrics[f"candidate/{name}/transference"] = self._window_scores[name] / steps
        self._window_wins = dict.fromkeys(self.candidates, 0)
        self._window_scores = dict.fromkeys(self.candidates, 0.0)
        self._window_steps = 0
        return metrics

    # -- the step ---------------------------------------------------------------------------------

    def backward(self, losses: Mapping[str, torch.Tensor], model: nn.Module) -> None:
        shared, specific = split_parameters(self.problem, model)
        rows = task_gradients(losses, self.tasks, [*shared, *specific])
        jacobian = torch.stack(
            [torch.cat([g.reshape(-1) for g in row[: len(shared)]]) for row in rows]
        )
        weights = self._task_weights(losses, jacobian)
        weighted = weights[:, None] * jacobian
        gradients = {name: self._candidate(name, weighted) for name in self.candidates}
        heads = [
            sum(w * row[index] for w, row in zip(weights, rows, strict=True))
            for index in range(len(shared), len(shared) + len(specific))
        ]
        before = torch.stack([losses[task].detach() for task in self.tasks]).float()
        scores = self._scores(model, shared, specific, gradients, heads, jacobian, before)
        choice = max(scores, key=lambda name: scores[name])
        for parameter, grad in zip(shared, _views(gradients[choice], shared), strict=True):
            parameter.grad = grad.clone()
        for parameter, grad in zip(specific, heads, strict=True):
            parameter.grad = grad  # type: ignore[assignment]
        self.last_scores = scores
        self.wins[choice] += 1
        self._window_wins[choice] += 1
        self._window_steps += 1
        for name, score in scores.items():
            self._window_scores[name] += score if math.isfinite(score) else 0.0
        self._replay = None

    def _task_weights(
        self, losses: Mapping[str, torch.Tensor], jacobian: torch.Tensor
    ) -> torch.Tensor:
        """1 per task, or UW's ½ e^{−s_k}; UW's log-variances get their gradient here."""
        if self.scalarizer is None:
            return torch.ones(len(self.tasks), device=jacobian.device, dtype=jacobian.dtype)
        values = torch.stack([losses[task].detach() for task in self.tasks]).float()
        self.scalarizer(values).backward()  # only the log-variances are in this graph
        log_var = self.scalarizer.log_var.detach()
        return (0.5 * torch.exp(-log_var)).to(jacobian.device, jacobian.dtype)

    def _candidate(self, name: str, weighted: torch.Tensor) -> torch.Tensor:
        if name in self.tasks:
            return weighted[self.tasks.index(name)]
        return self.aggregators[name](weighted)

    def _step(
        self, params: Sequence[nn.Parameter], grads: Sequence[torch.Tensor]
    ) -> list[torch.Tensor]:
        """Δ: the update the lookahead simulates for ``grads`` on ``params``."""
        optimizer = self.optimizer
        if optimizer is None or self.lookahead == "sgd":
            lr = self.lr if optimizer is None else optimizer.param_groups[0]["lr"]
            return [lr * g for g in grads]
        if isinstance(optimizer, torch.optim.SGD):
            return _sgd_update(optimizer, params, grads)
        return _adam_update(optimizer, params, grads)

    def _scores(
        self,
        model: nn.Module,
        shared: list[nn.Parameter],
        specific: list[nn.Parameter],
        gradients: Mapping[str, torch.Tensor],
        heads: Sequence[torch.Tensor],
        jacobian: torch.Tensor,
        before: torch.Tensor,
    ) -> dict[str, float]:
        floor = torch.finfo(before.dtype).tiny
        steps = {
            name: torch.cat([d.reshape(-1) for d in self._step(shared, _views(g, shared))])
            for name, g in gradients.items()
        }
        if self.first_order:
            log_product = (jacobian / before.clamp(min=floor)[:, None].to(jacobian.dtype)).sum(0)
            values = torch.stack([log_product @ step for step in steps.values()])
            return self._finite(dict(zip(steps, values.tolist(), strict=True)))
        if self._replay is None:
            raise invalid("replay", None, "set by the training loop before each exact IT-MTL step")
        return self._finite(
            self._lookahead_scores(model, shared, specific, steps, heads, before.clamp(min=floor))
        )

    @torch.no_grad()
    def _lookahead_scores(
        self,
        model: nn.Module,
        shared: list[nn.Parameter],
        specific: list[nn.Parameter],
        steps: Mapping[str, torch.Tensor],
        heads: Sequence[torch.Tensor],
        before: torch.Tensor,
    ) -> dict[str, float]:
        """Eq. 2 for every candidate's step; parameters and buffers are restored."""
        assert self._replay is not None
        saved = [p.detach().clone() for p in (*shared, *specific)]
        buffers = [b.detach().clone() for b in model.buffers()]  # BatchNorm statistics
        for p, delta in zip(specific, self._step(specific, heads), strict=True):
            p.sub_(delta)
        totals = []
        for step in steps.values():
            for p, delta in zip(shared, _views(step, shared), strict=True):
                p.sub_(delta)
            after = self._replay(model)
            ratios = torch.stack([after[t].detach() for t in self.tasks]).to(before.dtype) / before
            totals.append((1.0 - ratios).sum())
            for p, value in zip(shared, saved[: len(shared)], strict=True):
                p.copy_(value)
            for b, value in zip(model.buffers(), buffers, strict=True):
                b.copy_(value)
        for p, value in zip((*shared, *specific), saved, strict=True):
            p.copy_(value)
        return dict(zip(steps, torch.stack(totals).tolist(), strict=True))

    @staticmethod
    def _finite(scores: dict[str, float]) -> dict[str, float]:
        """A NaN score (a loss that became non-finite in a lookahead) never wins."""
        return {name: s if not math.isnan(s) else -math.inf for name, s in scores.items()}


@dataclass(frozen=True)
class IncreasedTransfer(Baseline):
    """Options: ``candidates`` (names, see the module docstring), ``first_order`` (Section 4.1),
    ``lookahead`` (``optimizer``: simulate the run's Adam or SGD step; ``sgd``: η g),
    ``weighting`` (``equal`` or ``uw``)."""

    name: ClassVar[str] = "itmtl"
    reference: ClassVar[str] = "Fifty et al., 2021 (IT-MTL, Algorithm 1)"
    candidates: tuple[str, ...] = ("ew", EACH_TASK)
    first_order: bool = False
    lookahead: str = "optimizer"
    weighting: str = "equal"

    def __post_init__(self) -> None:
        candidates = self.candidates
        if isinstance(candidates, list):
            object.__setattr__(self, "candidates", tuple(candidates))
        if (
            not isinstance(self.candidates, tuple)
            or not self.candidates
            or not all(isinstance(name, str) for name in self.candidates)
        ):
            raise invalid("candidates", candidates, "a non-empty list of candidate names")
        if not isinstance(self.first_order, bool):
            raise invalid("first_order", self.first_order, "true or false")
        if self.lookahead not in LOOKAHEADS:
            raise one_of("lookahead", self.lookahead, LOOKAHEADS)
        if self.weighting not in WEIGHTINGS:
            raise one_of("weighting", self.weighting, WEIGHTINGS)

    def _rule(self, problem: Problem, lr: float) -> TransferenceRule:
        return TransferenceRule(
            problem,
            self.candidates,
            first_order=self.first_order,
            lookahead=self.lookahead,
            weighting=self.weighting,
            lr=lr,
        )

    def rule(self, problem: Problem) -> UpdateRule:
        return self._rule(problem, lr=1e-3)

    def rule_for(self, problem: Problem, config: ForkMergeConfig) -> UpdateRule:
        return self._rule(problem, lr=config.lr)


@dataclass(frozen=True)
class IncreasedTransferFirstOrder(IncreasedTransfer):
    name: ClassVar[str] = "itmtl-fo"
    reference: ClassVar[str] = "Fifty et al., 2021 (IT-MTL‡, first-order, Section 4.1)"
    first_order: bool = True


@dataclass(frozen=True)
class IncreasedTransferPcGrad(IncreasedTransfer):
    name: ClassVar[str] = "it-pcgrad"
    reference: ClassVar[str] = "Fifty et al., 2021 (IT-PCGrad)"
    candidates: tuple[str, ...] = ("ew", "pcgrad")


@dataclass(frozen=True)
class IncreasedTransferUwPcGrad(IncreasedTransfer):
    name: ClassVar[str] = "it-uw-pcgrad"
    reference: ClassVar[str] = "Fifty et al., 2021 (IT-UW-PCGrad)"
    candidates: tuple[str, ...] = ("ew", "pcgrad")
    weighting: str = "uw"
