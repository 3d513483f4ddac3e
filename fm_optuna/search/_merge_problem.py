"""One merge as data: what a merge search sees, searchable live, saved and searched again.

A :class:`MergeProblem` holds the branches' states stacked (the candidates are combined from
them), the branch names and own validation scores, the round, the inner study's seed and warm
start, and the :class:`~fm_optuna.problem.Problem` that scores a candidate. The ForkMerge loop
searches one at every merge; with :class:`MergeProblemWriter` observing a run, each is saved
(``torch.save``) with how to rebuild its data, so ``fm-optuna compare --replay`` can run every
strategy on exactly the same merges.

Example:
    >>> data = merge.to_data(decision=decision, config=config.as_params())  # doctest: +SKIP
    >>> same = MergeProblem.from_data(data, problem)  # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fm_optuna.core._events import MergeCompleted, Observer
from fm_optuna.core._merging import BranchStack
from fm_optuna.core._training import seeded_model, target_score
from fm_optuna.errors import invalid
from fm_optuna.problem._tasks import Problem, Split, has_capability
from fm_optuna.search._base import Candidates, MergeDecision, MergeStrategy
from fm_optuna.search._evaluation import EVALUATION_CHUNKS, PRUNE_SIGMAS
from fm_optuna.search._search import search_merge

FORMAT = 1
KIND = "fm_optuna.merge_problem"


def check_strategy_supported(problem: Problem, strategy: MergeStrategy) -> None:
    """Raise :class:`ConfigError` before any training when the problem cannot serve ``strategy``."""
    if strategy.needs_loss_gradient and not has_capability(problem, "target_loss"):
        raise invalid(
            "strategy",
            strategy.name,
            f"a strategy the `{problem.name}` problem supports (`{strategy.name}` needs a "
            "differentiable target_loss, which digits and qm9 have)",
        )


class _TargetLoss(nn.Module):
    """The problem's target loss as a module, so ``functional_call`` can swap in merged states."""

    def __init__(self, problem: Problem, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.problem = problem

    def forward(self) -> torch.Tensor:
        return self.problem.target_loss(self.model, "val")


@dataclass
class MergeProblem:
    """What one merge search sees; scores candidates Λ on the problem's target.

    Attributes:
        problem: Scores candidates (its validation and test splits).
        stack: The branches' states; a candidate is ``stack.combine(Λ)``.
        names: Branch names, in stack order.
        branch_scores: Each branch's own target validation score.
        round: The merge's round (1-based) and ``step`` the training step it happened at.
        seed: The inner study's seed at this merge.
        warm_start: The previous merge's Λ* (``None`` at the first merge).
        model: A scratch model candidates are loaded into.
    """

    problem: Problem
    stack: BranchStack
    names: tuple[str, ...]
    branch_scores: tuple[float, ...]
    round: int
    step: int
    seed: int
    warm_start: tuple[float, ...] | None
    model: nn.Module

    @property
    def n_branches(self) -> int:
        return self.stack.n_branches

    def _load(self, weights: Sequence[float] | np.ndarray) -> nn.Module:
        self.model.load_state_dict(self.stack.combine(weights))
        return self.model

    def score(self, weights: Sequence[float] | np.ndarray, split: Split = "val") -> float:
        """The target's score (higher is better) of Σ Λ_b θ_b on ``split``."""
        return target_score(self.problem, self._load(weights), split)[0]

    def chunk_scores(self, weights: np.ndarray, chunks: int) -> Iterator[tuple[float, int]]:
        """The target's validation score chunk by chunk (see ``Problem.target_chunks``)."""
        yield from self.problem.target_chunks(self._load(weights), "val", chunks)

    def example_scores(self, weights: np.ndarray) -> Callable[[np.ndarray | None], np.ndarray]:
        """The target's validation score of each example, for the candidate ``weights``
        (loaded once: its parts are scored by calling the result with examples' indices)."""
        model = self._load(weights)

        def scores(index: np.ndarray | None) -> np.ndarray:
            chosen = None if index is None else torch.as_tensor(index, dtype=torch.long)
            return self.problem.target_example_scores(model, chosen).cpu().numpy()

        return scores

    def loss_gradient(self, weights: np.ndarray) -> tuple[float, np.ndarray]:
        """The target's validation loss at Λ and its gradient in Λ, through the stacked states.

        The gradient flows through the parameters; buffers (BatchNorm statistics) follow Λ but
        count as constants, as in AdaMerging (eval-mode BatchNorm is not differentiable in them).
        """
        lam = torch.tensor(np.asarray(weights, dtype=np.float64), requires_grad=True)
        state = self.stack.combine_tensor(lam)
        parameters = {name for name, _ in self.model.named_parameters()}
        state = {k: v if k in parameters else v.detach() for k, v in state.items()}
        loss = torch.func.functional_call(
            _TargetLoss(self.problem, self.model),
            {f"model.{key}": value for key, value in state.items()},
            (),
        )
        loss.backward()
        assert lam.grad is not None
        value = float(loss.detach())
        return (value if math.isfinite(value) else math.nan), lam.grad.numpy().copy()

    def candidates(self) -> Candidates:
        """This merge's candidates as a search sees them, with every capability the problem has."""
        maximum = self.problem.target_example_score_max
        return Candidates(
            score=self.score,
            chunk_scores=self.chunk_scores
            if has_capability(self.problem, "target_chunks")
            else None,
            loss_gradient=self.loss_gradient
            if has_capability(self.problem, "target_loss")
            else None,
            example_scores=self.example_scores if self._scores_examples() else None,
            example_score_max=math.inf if maximum is None else maximum,
        )

    def _scores_examples(self) -> bool:
        return (
            has_capability(self.problem, "target_example_scores")
            and self.problem.target_example_score_max is not None
        )

    def search(
        self,
        strategy: MergeStrategy,
        budget: int,
        *,
        evaluation: str = "exact",
        chunks: int = EVALUATION_CHUNKS,
        prune_margin: float = 0.0,
        prune_sigmas: float = PRUNE_SIGMAS,
        seed: int | None = None,
    ) -> MergeDecision:
        """Run ``strategy`` on this merge (the same call the ForkMerge loop makes)."""
        return search_merge(
            self.candidates(),
            strategy=strategy,
            n_branches=self.n_branches,
            budget=budget,
            seed=self.seed if seed is None else seed,
            branch_scores=self.branch_scores,
            warm_start=self.warm_start,
            evaluation=evaluation,
            chunks=chunks,
            prune_margin=prune_margin,
            prune_sigmas=prune_sigmas,
        )

    def to_data(
        self, *, decision: MergeDecision | None = None, config: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """A ``torch.save``-able record of this merge (states on the CPU)."""
        return {
            "kind": KIND,
            "format": FORMAT,
            "round": self.round,
            "step": self.step,
            "seed": self.seed,
            "names": list(self.names),
            "branch_scores": list(self.branch_scores),
            "warm_start": None if self.warm_start is None else list(self.warm_start),
            "states": [
                {key: value.detach().cpu().clone() for key, value in self.stack.branch(i).items()}
                for i in range(self.n_branches)
            ],
            "decision": None if decision is None else decision.to_dict(),
            "config": dict(config or {}),
            "problem": {str(k): v for k, v in self.problem.describe().items()},
        }

    @classmethod
    def from_data(
        cls, data: Mapping[str, Any], problem: Problem, model: nn.Module | None = None
    ) -> MergeProblem:
        """The merge saved by :meth:`to_data`, scored on ``problem`` (rebuilt the same way)."""
        if data.get("kind") != KIND or data.get("format") != FORMAT:
            raise invalid("merge problem", data.get("kind"), f"a {KIND} of format {FORMAT}")
        device = problem.device
        states = [{k: v.to(device) for k, v in state.items()} for state in data["states"]]
        return cls(
            problem=problem,
            stack=BranchStack(states),
            names=tuple(data["names"]),
            branch_scores=tuple(float(s) for s in data["branch_scores"]),
            round=int(data["round"]),
            step=int(data["step"]),
            seed=int(data["seed"]),
            warm_start=None if data["warm_start"] is None else tuple(data["warm_start"]),
            model=model if model is not None else seeded_model(problem, 0),
        )


def load_data(path: Path) -> dict[str, Any]:
    """A saved merge problem's record (see :meth:`MergeProblem.to_data`)."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError) as error:
        raise invalid("replay", str(path), f"a readable merge problem ({error})") from None
    if not isinstance(data, dict) or data.get("kind") != KIND:
        raise invalid("replay", str(path), "a merge problem saved by fm-optuna")
    return data


class MergeProblemWriter(Observer):
    """Saves every merge problem of the observed runs to ``folder`` as ``<run>-round<r>.pt``.

    ``source`` says how to rebuild the problem (``benchmark``, ``target``, ``seed``,
    ``options``: the arguments of :func:`fm_optuna.benchmarks.build_problem`); ``on_saved`` is
    called with the run name and each file (the CLI logs it as an MLflow artifact).
    """

    def __init__(
        self,
        folder: Path,
        source: Mapping[str, Any],
        on_saved: Callable[[str, Path], None] | None = None,
    ) -> None:
        self.folder, self.source, self.on_saved = Path(folder), dict(source), on_saved
        self.paths: list[Path] = []

    def on_merge_completed(self, event: MergeCompleted) -> None:
        if event.merge_problem is None:
            return
        data = {**event.merge_problem(), "source": self.source}
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{event.run}-round{event.round:03d}.pt"
        torch.save(data, path)
        self.paths.append(path)
        if self.on_saved is not None:
            self.on_saved(event.run, path)


def artifact_logger(observers: Sequence[Any]) -> Any:
    """A callback logging a saved merge problem to the MLflow run of the tracker among
    ``observers`` (under ``merge_problems/``), or ``None`` when nothing is tracked."""
    trackers = [o for o in observers if hasattr(o, "log_file") and hasattr(o, "store")]
    if not trackers:
        return None
    tracker = trackers[0]

    def log(run: str, path: Path) -> None:
        # Queued behind the run's events; the tracker counts it as not logged after an error.
        tracker.log_file(run, path, "merge_problems")

    return log
