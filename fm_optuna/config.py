"""The run configuration of ForkMerge and of every baseline, with its allowed values.

It sits at the bottom of the package: the loop, the rankings, the baselines, the outer study and
the CLI all read it, and it reads nothing of theirs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from fm_optuna.branches import PLANS
from fm_optuna.errors import invalid, one_of
from fm_optuna.strategies import STRATEGIES, make_strategy

OPTIMIZER_POLICIES = ("keep", "reset", "average")
FINAL_MODELS = ("last", "best")
RANKINGS = ("prepass", "given", "affinity")


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
        pruned_evaluation: Score merge candidates chunk by chunk on the validation set and stop
            those that trail the best finished candidate (problems without ``target_chunks``
            evaluate whole); the chosen Λ is always fully evaluated.
        evaluation_chunks: Validation chunks of a pruned evaluation.
        plan: ``pruned`` (Alg. 4), ``pairwise`` (Alg. 1/2) or ``joint`` (App. A.4).
        branches: L, the number of branches (``None``: the plan's default).
        ranking: ``prepass`` (short target+aux runs ranked by target validation, the official
            code) or ``given`` (the order of ``aux_order``, else the benchmark's task order).
        ranking_steps: Steps of each pre-pass run (``None``: Δt).
        aux_order: Explicit best-first order of the auxiliaries for ``ranking="given"``.
        optimizer_policy: What happens to optimizer state at a merge: ``keep`` (each branch keeps
            its moments, as the official code), ``reset`` or ``average`` (moments averaged by Λ).
        final: ``last`` merge or ``best``-validated merge is the final model.
        lr: Adam learning rate.
        seed: Seeds model initialisation, data order and every inner study.
        log_every: Steps between training-loss reports.
    """

    dt: int = 100
    total_steps: int = 600
    strategy: str = "grid"
    merge_trials: int = 20
    grid_resolution: float = 0.1
    pruned_evaluation: bool = False
    evaluation_chunks: int = 4
    plan: str = "pruned"
    branches: int | None = None
    ranking: str = "prepass"
    ranking_steps: int | None = None
    aux_order: tuple[str, ...] | None = None
    optimizer_policy: str = "keep"
    final: str = "last"
    lr: float = 1e-3
    seed: int = 0
    log_every: int = 25

    def __post_init__(self) -> None:
        if not isinstance(self.total_steps, int) or self.total_steps < 1:
            raise invalid("steps", self.total_steps, "a positive integer")
        if not isinstance(self.dt, int) or not 1 <= self.dt <= self.total_steps:
            raise invalid("dt", self.dt, f"an integer from 1 to steps ({self.total_steps})")
        if self.strategy not in STRATEGIES:
            raise one_of("strategy", self.strategy, STRATEGIES)
        if not isinstance(self.merge_trials, int) or self.merge_trials < 1:
            raise invalid("merge_trials", self.merge_trials, "a positive integer")
        if not isinstance(self.pruned_evaluation, bool):
            raise invalid("pruned_evaluation", self.pruned_evaluation, "true or false")
        if not isinstance(self.evaluation_chunks, int) or self.evaluation_chunks < 2:
            raise invalid("evaluation_chunks", self.evaluation_chunks, "an integer of at least 2")
        if self.plan not in PLANS:
            raise one_of("plan", self.plan, PLANS)
        if self.ranking not in RANKINGS:
            raise one_of("ranking", self.ranking, RANKINGS)
        if self.ranking_steps is not None and self.ranking_steps < 1:
            raise invalid("ranking_steps", self.ranking_steps, "a positive integer")
        if self.optimizer_policy not in OPTIMIZER_POLICIES:
            raise one_of("optimizer_policy", self.optimizer_policy, OPTIMIZER_POLICIES)
        if self.final not in FINAL_MODELS:
            raise one_of("final", self.final, FINAL_MODELS)
        if not self.lr > 0:
            raise invalid("lr", self.lr, "a positive number")
        if self.log_every < 1:
            raise invalid("log_every", self.log_every, "a positive integer")
        make_strategy(self.strategy, resolution=self.grid_resolution)  # validates its options

    @property
    def rounds(self) -> int:
        return math.ceil(self.total_steps / self.dt)

    def as_params(self) -> dict[str, Any]:
        params = asdict(self)
        params["aux_order"] = ",".join(self.aux_order) if self.aux_order else None
        return params
