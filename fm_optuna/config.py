"""The run configuration of ForkMerge and of every baseline, with its allowed values.

It sits at the bottom of the package: the loop, the rankings, the baselines, the outer study and
the CLI all read it, and it reads nothing of theirs.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, TypeAlias

from fm_optuna.core._branches import CUT_RULES, PLANS, check_keep
from fm_optuna.errors import check_finite, invalid, one_of
from fm_optuna.search.strategies import STRATEGIES, make_strategy

if TYPE_CHECKING:
    import torch

OPTIMIZER_POLICIES = ("keep", "reset", "average")
FINAL_MODELS = ("last", "best")
RANKINGS = ("prepass", "given", "affinity", "merge")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULERS = ("none", "cosine", "step")

#: ``params -> Optimizer``, e.g. ``functools.partial(torch.optim.RMSprop, lr=1e-3)``.
OptimizerFactory: TypeAlias = "Callable[[Iterable[torch.Tensor]], torch.optim.Optimizer]"
#: ``optimizer -> LRScheduler``, stepped once per optimizer step, e.g.
#: ``functools.partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=1e-2, total_steps=600)``.
SchedulerFactory: TypeAlias = (
    "Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]"
)


def factory_name(value: object) -> str:
    """A loggable name for a configured value: a string as is, a callable by its qualified name.

    Example:
        >>> factory_name("adam"), factory_name(functools.partial(max, 1))
        ('adam', 'partial(max)')
    """
    if isinstance(value, str):
        return value
    if isinstance(value, functools.partial):
        return f"partial({factory_name(value.func)})"
    name = getattr(value, "__qualname__", None) or type(value).__qualname__
    module = getattr(value, "__module__", None)
    return f"{module}.{name}" if module and module != "builtins" else name


@dataclass(frozen=True)
class ForkMergeConfig:
    """Everything that defines a ForkMerge run; logged as run parameters and checkpointed.

    Attributes:
        dt: Merge interval Δt in optimizer steps.
        total_steps: Training budget T in optimizer steps (per branch).
        strategy: Merge-search strategy (``grid``, ``binary``, ``greedy``, ``tpe``, ``cmaes``,
            ``random``).
        merge_trials: Inner-study budget for the strategies that take one.
        grid_resolution: Lattice step of ``grid``.
        full_evaluation: Score every merge candidate on the whole validation set. By default a
            candidate of ``grid``, ``random`` or ``tpe`` on a problem with
            ``target_example_scores`` is scored part by part and stopped once it can matter
            neither to the decision nor to the sampler's later proposals: the same search, for
            fewer forwards (``evaluation = "exact"`` of :func:`fm_optuna.search.search_merge`).
        pruned_evaluation: Score merge candidates part by part on the validation set and stop
            those that can no longer win, even if the sampler's later proposals change: exactly,
            hardest examples first, for problems with ``target_example_scores``
            (``search._evaluation``); by the noise-aware ``prune_sigmas`` rule for those
            with only ``target_chunks``; others evaluate whole. The chosen Λ is always fully
            evaluated.
        evaluation_chunks: Validation parts of an exact or pruned evaluation.
        prune_sigmas: For problems scored chunk by chunk only: how many standard errors of what
            the remaining chunks could add a candidate must trail the best finished one by
            before it is stopped (0: any deficit).
        plan: ``pruned`` (Alg. 4), ``pairwise`` (Alg. 1/2) or ``joint`` (App. A.4).
        branches: L, the number of branches (``None``: the plan's default).
        ranking: ``prepass`` (short target+aux runs ranked by target validation, the official
            code), ``affinity`` (lookahead inter-task affinity), ``merge`` (the Λ_k one Alg. 2
            merge gives each auxiliary, the paper's Alg. 4) or ``given`` (the order of
            ``aux_order``, else the benchmark's task order).
        ranking_steps: Steps of each pre-pass run (``None``: Δt).
        aux_order: Explicit best-first order of the auxiliaries for ``ranking="given"``.
        cut: Which intermediate ν^k a pruned plan keeps: ``auto`` (relevance drops that stand
            out of the noise, else evenly spread), ``spread`` or ``gaps`` (the largest drops);
            see :mod:`fm_optuna.core._branches`.
        keep: Explicit top-k counts of the kept branches, from 0 (target only) to n (all), as
            the official code's lists, e.g. ``(0, 1, 3)``; fixes L = len(keep) and overrides
            ``cut``.
        optimizer_policy: What happens to optimizer state at a merge: ``keep`` (each branch keeps
            its moments, as the official code), ``reset`` or ``average`` (moments averaged by Λ).
        final: ``last`` merge or ``best``-validated merge is the final model.
        lr: Learning rate of the named optimizer (a factory sets its own).
        optimizer: ``adam`` (default), ``adamw``, ``sgd``, or a callable ``params -> Optimizer``
            (the API's way to any optimizer). Every branch, baseline and pre-pass run uses it.
        momentum: SGD momentum (``optimizer="sgd"`` only).
        weight_decay: Weight decay of the named optimizer (decoupled for ``adamw``).
        scheduler: ``none``, ``cosine`` (cosine annealing to 0 over T), ``step`` (× ``lr_gamma``
            every ``lr_step_size`` steps), or a callable ``optimizer -> LRScheduler``. It steps
            once per optimizer step over the whole T; each branch keeps its own across merges.
        lr_step_size: Steps between decays of ``step`` (``None``: a third of T).
        lr_gamma: Decay factor of ``step``.
        clip_grad_norm: Clip the gradient's total 2-norm to this before each step (``None``: no
            clipping).
        amp: Automatic mixed precision on CUDA (autocast, and a GradScaler for weighted-sum
            updates); ignored, with a note, on CPU.
        seed: Seeds model initialisation, data order and every inner study.
        log_every: Steps between training-loss reports.
    """

    dt: int = 100
    total_steps: int = 600
    strategy: str = "grid"
    merge_trials: int = 20
    grid_resolution: float = 0.1
    full_evaluation: bool = False
    pruned_evaluation: bool = False
    evaluation_chunks: int = 4
    prune_sigmas: float = 2.0
    plan: str = "pruned"
    branches: int | None = None
    ranking: str = "prepass"
    ranking_steps: int | None = None
    aux_order: tuple[str, ...] | None = None
    cut: str = "auto"
    keep: tuple[int, ...] | None = None
    optimizer_policy: str = "keep"
    final: str = "last"
    lr: float = 1e-3
    seed: int = 0
    log_every: int = 25
    optimizer: str | OptimizerFactory = "adam"
    momentum: float = 0.0
    weight_decay: float = 0.0
    scheduler: str | SchedulerFactory = "none"
    lr_step_size: int | None = None
    lr_gamma: float = 0.1
    clip_grad_norm: float | None = None
    amp: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.total_steps, int) or self.total_steps < 1:
            raise invalid("steps", self.total_steps, "a positive integer")
        if not isinstance(self.dt, int) or not 1 <= self.dt <= self.total_steps:
            raise invalid("dt", self.dt, f"an integer from 1 to steps ({self.total_steps})")
        if self.strategy not in STRATEGIES:
            raise one_of("strategy", self.strategy, STRATEGIES)
        if not isinstance(self.merge_trials, int) or self.merge_trials < 1:
            raise invalid("merge_trials", self.merge_trials, "a positive integer")
        for name in ("full_evaluation", "pruned_evaluation"):
            if not isinstance(getattr(self, name), bool):
                raise invalid(name, getattr(self, name), "true or false")
        if self.full_evaluation and self.pruned_evaluation:
            raise invalid(
                "full_evaluation", True, "false when pruned_evaluation is true (choose one)"
            )
        if not isinstance(self.evaluation_chunks, int) or self.evaluation_chunks < 2:
            raise invalid("evaluation_chunks", self.evaluation_chunks, "an integer of at least 2")
        check_finite("prune_sigmas", self.prune_sigmas, "a non-negative number")
        if self.prune_sigmas < 0:
            raise invalid("prune_sigmas", self.prune_sigmas, "a non-negative number")
        if self.plan not in PLANS:
            raise one_of("plan", self.plan, PLANS)
        if self.ranking not in RANKINGS:
            raise one_of("ranking", self.ranking, RANKINGS)
        if self.ranking_steps is not None and self.ranking_steps < 1:
            raise invalid("ranking_steps", self.ranking_steps, "a positive integer")
        if self.cut not in CUT_RULES:
            raise one_of("cut", self.cut, CUT_RULES)
        if self.keep is not None:
            self._check_keep()
        if self.optimizer_policy not in OPTIMIZER_POLICIES:
            raise one_of("optimizer_policy", self.optimizer_policy, OPTIMIZER_POLICIES)
        if self.final not in FINAL_MODELS:
            raise one_of("final", self.final, FINAL_MODELS)
        if not check_finite("lr", self.lr, "a positive number") > 0:
            raise invalid("lr", self.lr, "a positive number")
        if self.log_every < 1:
            raise invalid("log_every", self.log_every, "a positive integer")
        check_finite("grid_resolution", self.grid_resolution, "a positive number")
        make_strategy(self.strategy, resolution=self.grid_resolution)  # validates its options
        self._check_training_hooks()

    def _check_training_hooks(self) -> None:
        if isinstance(self.optimizer, str):
            if self.optimizer not in OPTIMIZERS:
                raise one_of("optimizer", self.optimizer, OPTIMIZERS)
        elif not callable(self.optimizer):
            raise invalid("optimizer", self.optimizer, "one of adam, adamw, sgd or a callable")
        named = isinstance(self.optimizer, str)
        if not 0 <= check_finite("momentum", self.momentum) < 1:
            raise invalid("momentum", self.momentum, "a number in [0, 1)")
        if self.momentum and self.optimizer != "sgd":
            raise invalid("momentum", self.momentum, "0 unless optimizer = sgd")
        if check_finite("weight_decay", self.weight_decay) < 0:
            raise invalid("weight_decay", self.weight_decay, "a non-negative number")
        if self.weight_decay and not named:
            raise invalid("weight_decay", self.weight_decay, "0 with an optimizer factory")
        if isinstance(self.scheduler, str):
            if self.scheduler not in SCHEDULERS:
                raise one_of("scheduler", self.scheduler, SCHEDULERS)
        elif not callable(self.scheduler):
            raise invalid("scheduler", self.scheduler, "one of cosine, none, step or a callable")
        if self.lr_step_size is not None and (
            isinstance(self.lr_step_size, bool)
            or not isinstance(self.lr_step_size, int)
            or self.lr_step_size < 1
        ):
            raise invalid("lr_step_size", self.lr_step_size, "a positive integer")
        if not 0 < check_finite("lr_gamma", self.lr_gamma) <= 1:
            raise invalid("lr_gamma", self.lr_gamma, "a number in (0, 1]")
        if self.clip_grad_norm is not None and not (
            check_finite("clip_grad_norm", self.clip_grad_norm, "a positive number") > 0
        ):
            raise invalid("clip_grad_norm", self.clip_grad_norm, "a positive number")
        if not isinstance(self.amp, bool):
            raise invalid("amp", self.amp, "true or false")

    def _check_keep(self) -> None:
        check_keep(self.keep)
        if self.plan == "pairwise":
            raise invalid("keep", _joined(self.keep), "used only with the pruned or joint plan")
        if self.branches is not None and self.branches != len(self.keep):
            raise invalid("branches", self.branches, f"{len(self.keep)} (the length of keep)")

    @property
    def rounds(self) -> int:
        return math.ceil(self.total_steps / self.dt)

    @property
    def evaluation(self) -> str:
        """How merge candidates are scored: ``exact`` (default), ``full`` or ``pruned``."""
        return "pruned" if self.pruned_evaluation else "full" if self.full_evaluation else "exact"

    def as_params(self) -> dict[str, Any]:
        # Not asdict: it would deep-copy an optimizer or scheduler factory.
        params = {f.name: getattr(self, f.name) for f in fields(self)}
        params["aux_order"] = ",".join(self.aux_order) if self.aux_order else None
        params["keep"] = _joined(self.keep) if self.keep else None
        params["optimizer"] = factory_name(self.optimizer)
        params["scheduler"] = factory_name(self.scheduler)
        return params


def _joined(values: tuple[int, ...]) -> str:
    return ",".join(str(value) for value in values)
