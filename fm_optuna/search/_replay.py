"""``fm-optuna compare --replay``: every merge-search strategy on exactly the same saved merges.

Merge problems saved by a run (:class:`~fm_optuna.search.MergeProblemWriter`) are loaded
back, their data rebuilt from the saved recipe, and every strategy searches each of them at
several budgets. Per strategy the comparison reports, over the problems (mean and spread):

- the anytime curve: regret of the best validation score found after n evaluations (at the
  largest budget; an evaluation is one validation pass, so pruned candidates count in part);
- the regret of the chosen merge at each budget, against the best Λ known for the problem (the
  best candidate any strategy evaluated, grid's 0.1 lattice included where it is affordable);
- the evaluations needed to come within ``tolerance`` of that best (absolute, in the target
  score's units, or relative to the best known score, see :class:`Tolerance`);
- seconds per evaluation (sampler time included) and the test score of the chosen merge.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fm_optuna._results import save_table
from fm_optuna.errors import invalid, one_of
from fm_optuna.problem._tasks import Problem, has_capability
from fm_optuna.search._base import MergeDecision
from fm_optuna.search._evaluation import PRUNE_SIGMAS
from fm_optuna.search._merge_problem import MergeProblem, load_data
from fm_optuna.search.strategies import STRATEGIES, make_strategy
from fm_optuna.search.strategies.grid import simplex_lattice

#: Strategies whose evaluations do not depend on the budget (run once per problem).
FIXED_DESIGNS = ("grid", "greedy")


_TOLERANCE_FORMS = "a non-negative number, or a percentage such as 1%"


@dataclass(frozen=True)
class Tolerance:
    """How close to a merge's best known validation score counts as reaching it.

    Absolute (``value`` in the target score's units: 0.1 = 0.1 pp of accuracy), or ``relative``
    (``value`` in percent of the best known score's magnitude). A minimised metric such as
    QM9's MAE is scored as −MAE, so regret is already "MAE above the best"; but an absolute
    step means little across targets and units (0.1 D is over 10 % of μ's MAE at small
    scale), hence the relative form.

    Example:
        >>> Tolerance.parse("1%").of(-0.62)
        0.0062
        >>> str(Tolerance.parse("0.1"))
        '0.1'
    """

    value: float
    relative: bool = False

    def __post_init__(self) -> None:
        if not (self.value >= 0 and math.isfinite(self.value)):
            raise invalid("tolerance", self.value, _TOLERANCE_FORMS)

    @classmethod
    def parse(cls, text: str | float) -> Tolerance:
        """``"0.1"`` (absolute) or ``"1%"`` (relative to the best known score)."""
        raw = str(text).strip()
        relative = raw.endswith("%")
        try:
            value = float(raw.removesuffix("%"))
        except ValueError:
            raise invalid("tolerance", raw, _TOLERANCE_FORMS) from None
        return cls(value, relative)

    def of(self, best: float) -> float:
        """The tolerance in score units for a merge whose best known score is ``best``."""
        return self.value / 100 * abs(best) if self.relative else self.value

    def __str__(self) -> str:
        return f"{self.value:g}%" if self.relative else f"{self.value:g}"


@dataclass
class ReplayRun:
    """One strategy on one merge problem at one budget."""

    problem: str
    n_branches: int
    strategy: str
    budget: int
    evaluations: int
    passes: float  # validation passes (pruned candidates count in part)
    val: float
    test: float
    seconds: float
    curve: list[tuple[float, float]]  # (validation passes so far, best validation score so far)
    regret: float = math.nan  # filled once every strategy has run on the problem
    to_tolerance: float | None = None
    #: For the default (exact) evaluation: whether it proposed every candidate and chose the
    #: merge that full evaluation did on this problem (``None`` for other variants).
    same_search_as_full: bool | None = None
    #: The Λ the strategy chose, one weight per branch (saved in ``replay.json``).
    weights: tuple[float, ...] = ()


@dataclass
class ReplayComparison:
    config: dict[str, Any]
    runs: list[ReplayRun] = field(default_factory=list)
    best: dict[str, float] = field(default_factory=dict)  # problem -> best known val score
    tolerance: dict[str, float] = field(default_factory=dict)  # problem -> tolerance (score units)

    def relative_regret(self, run: ReplayRun) -> float:
        """The run's regret in percent of its merge's best known score's magnitude."""
        best = abs(self.best[run.problem])
        return 100 * run.regret / best if best > 0 else math.nan

    def groups(self) -> list[tuple[int, str]]:
        """(L, strategy) pairs in a stable order."""
        return sorted({(r.n_branches, r.strategy) for r in self.runs})

    def rows(self) -> list[dict[str, Any]]:
        """One row per L, strategy and budget: regret, reach, cost and test score."""
        rows = []
        for n, strategy in self.groups():
            mine = [r for r in self.runs if r.n_branches == n and r.strategy == strategy]
            for budget in sorted({r.budget for r in mine}):
                runs = [r for r in mine if r.budget == budget]
                reached = [r.to_tolerance for r in runs if r.to_tolerance is not None]
                rows.append(
                    {
                        "L": n,
                        "strategy": strategy,
                        "budget": budget,
                        "problems": len(runs),
                        "evaluations": statistics.mean(r.evaluations for r in runs),
                        "val_passes": statistics.mean(r.passes for r in runs),
                        "regret_mean": statistics.mean(r.regret for r in runs),
                        "regret_std": _std([r.regret for r in runs]),
                        "regret_max": max(r.regret for r in runs),
                        "regret_pct_mean": statistics.mean(self.relative_regret(r) for r in runs),
                        "regret_pct_std": _std([self.relative_regret(r) for r in runs]),
                        "within_tolerance": sum(
                            r.regret <= self.tolerance[r.problem] + 1e-9 for r in runs
                        )
                        / len(runs),
                        "passes_to_tolerance_median": statistics.median(reached)
                        if reached
                        else None,
                        "reached_tolerance": len(reached) / len(runs),
                        "seconds_per_evaluation": sum(r.seconds for r in runs)
                        / max(1, sum(r.evaluations for r in runs)),
                        "test_mean": statistics.mean(r.test for r in runs),
                        "test_std": _std([r.test for r in runs]),
                        "same_search_as_full": _share_same(runs),
                    }
                )
        return rows

    def anytime(self, n_branches: int, strategy: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Regret of the best found vs validation passes (largest budget): x, mean, std.

        In percent of the best known score when the tolerance is relative (as it is reported).
        """
        runs = [r for r in self.runs if r.n_branches == n_branches and r.strategy == strategy]
        largest = max(r.budget for r in runs)
        runs = [r for r in runs if r.budget == largest]
        horizon = max(r.passes for r in runs)
        x = np.arange(1, math.ceil(horizon) + 1, dtype=float)
        regrets = np.array([[self.best[r.problem] - _best_at(r.curve, p) for p in x] for r in runs])
        if Tolerance.parse(self.config["tolerance"]).relative:
            scale = np.array([100 / max(abs(self.best[r.problem]), 1e-12) for r in runs])
            regrets = regrets * scale[:, None]
        return x, regrets.mean(axis=0), regrets.std(axis=0)

    def save(self, directory: Path) -> dict[str, Path]:
        rows = self.rows()
        result = {
            "config": self.config,
            "best_known": self.best,
            "tolerance_by_problem": self.tolerance,
            "table": rows,
            "runs": [asdict(r) for r in self.runs],
        }
        paths = save_table(directory, "replay", rows, result)
        paths["plot"] = directory / "replay.png"
        plot_anytime(self, paths["plot"])
        return paths


def _std(values: Sequence[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _best_at(curve: Sequence[tuple[float, float]], passes: float) -> float:
    best = -math.inf
    for spent, score in curve:
        if spent > passes + 1e-9:
            break
        best = score
    return best


def anytime_curve(
    decision: MergeDecision, branch_scores: Sequence[float]
) -> list[tuple[float, float]]:
    """Best fully evaluated score after each evaluation; the branches' own scores come free."""
    best = max((s for s in branch_scores if math.isfinite(s)), default=-math.inf)
    curve, spent = [(0.0, best)], 0.0
    for trial in decision.trials:
        if trial.source != "evaluated":
            continue
        spent += trial.fraction
        if trial.state == "COMPLETE":
            best = max(best, trial.score)
        curve.append((spent, best))
    return curve


def passes_to_tolerance(
    curve: Sequence[tuple[float, float]], best: float, tolerance: float
) -> float | None:
    for spent, score in curve:
        if score >= best - tolerance - 1e-9:
            return spent
    return None


# --- loading -------------------------------------------------------------------------------------


def find_merge_problems(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise invalid("replay", str(folder), "a folder of saved merge problems (*.pt)")
    paths = sorted(folder.rglob("*.pt"))
    if not paths:
        raise invalid("replay", str(folder), "a folder holding saved merge problems (*.pt)")
    return paths


def load_merge_problems(
    paths: Sequence[Path], build: Callable[[Mapping[str, Any]], Problem]
) -> list[tuple[str, MergeProblem]]:
    """Each saved merge with its problem rebuilt by ``build(source)`` (once per recipe)."""
    problems: dict[str, Problem] = {}
    merges = []
    for path in paths:
        data = load_data(path)
        key = json.dumps(data["source"], sort_keys=True, default=str)
        if key not in problems:
            problems[key] = build(data["source"])
        merges.append((str(path), MergeProblem.from_data(data, problems[key])))
    return merges


# --- running -------------------------------------------------------------------------------------


def check_strategies(strategies: Sequence[str]) -> None:
    if not strategies:
        raise invalid("strategies", "", "a comma-separated list of " + ", ".join(STRATEGIES))
    for strategy in strategies:
        if strategy not in STRATEGIES:
            raise one_of("strategies", strategy, STRATEGIES)


@dataclass(frozen=True)
class Variant:
    """How one row of the comparison evaluates its candidates."""

    label: str
    strategy: str
    evaluation: str = "full"  # see ``search._evaluation.EVALUATIONS``
    prune_sigmas: float = PRUNE_SIGMAS


def _variants(
    strategies: Sequence[str], exact: bool, pruned: bool, sigmas: Sequence[float]
) -> list[Variant]:
    """Full evaluation of every strategy, then its exact and pruned variants when asked."""
    out = [Variant(s, s) for s in strategies]
    if exact:
        out += [Variant(f"{s}+exact", s, "exact") for s in strategies]
    if pruned:
        for z in sigmas:
            suffix = "+pruned" if len(sigmas) == 1 else f"+pruned{z:g}σ"
            out += [Variant(f"{s}{suffix}", s, "pruned", z) for s in strategies]
    return out


def replay(
    merges: Sequence[tuple[str, MergeProblem]],
    strategies: Sequence[str],
    budgets: Sequence[int],
    *,
    exact: bool = False,
    pruned: bool = False,
    chunks: int = 4,
    prune_sigmas: Sequence[float] = (PRUNE_SIGMAS,),
    tolerance: Tolerance | float = 0.1,
    lattice_max: int = 300,
    on_run: Callable[[ReplayRun], None] | None = None,
) -> ReplayComparison:
    """Run every strategy, scoring every candidate whole, on every merge; with ``exact`` also
    its default (exact) evaluation, checked against the full one, and with ``pruned`` its
    pruned-evaluation variant, one per value of ``prune_sigmas``. A float ``tolerance`` is
    absolute (score units)."""
    check_strategies(strategies)
    if not isinstance(tolerance, Tolerance):
        tolerance = Tolerance(tolerance)
    if not prune_sigmas or any(not (z >= 0 and math.isfinite(z)) for z in prune_sigmas):
        raise invalid(
            "prune_sigmas", list(prune_sigmas), "a comma-separated list of non-negative numbers"
        )
    if not budgets or any(b < 1 for b in budgets):
        raise invalid("budgets", list(budgets), "a comma-separated list of positive integers")
    comparison = ReplayComparison(
        config={
            "strategies": list(strategies),
            "budgets": sorted(budgets),
            "exact": exact,
            "pruned": pruned,
            "evaluation_chunks": chunks,
            "prune_sigmas": list(prune_sigmas),
            "tolerance": str(tolerance),
            "lattice_max": lattice_max,
            "problems": [name for name, _ in merges],
        }
    )
    for name, merge in merges:
        runs = []
        example_scored = merge.candidates().example_scores is not None
        full_trials: dict[tuple[str, int], Any] = {}
        for variant in _variants(strategies, exact, pruned, prune_sigmas):
            label = variant.label
            if example_scored and variant.evaluation == "pruned":
                # raced exactly: the noise bar plays no part, one variant is enough
                if variant.prune_sigmas != prune_sigmas[0]:
                    continue
                label = f"{variant.strategy}+pruned(exact)"
            strategy = make_strategy(variant.strategy)
            if strategy.needs_loss_gradient and not has_capability(merge.problem, "target_loss"):
                continue
            if variant.strategy == "grid" and strategy.n_trials(merge.n_branches, 1) > lattice_max:
                continue
            fixed = variant.strategy in FIXED_DESIGNS
            for budget in [max(budgets)] if fixed else budgets:
                if variant.strategy == "binary" and budget < merge.n_branches:
                    continue
                decision = merge.search(
                    strategy,
                    budget,
                    evaluation=variant.evaluation,
                    chunks=chunks,
                    prune_sigmas=variant.prune_sigmas,
                )
                run = ReplayRun(
                    problem=name,
                    n_branches=merge.n_branches,
                    strategy=label,
                    budget=budget,
                    evaluations=decision.n_trials,
                    passes=decision.validation_passes,
                    val=decision.score,
                    test=merge.score(np.asarray(decision.weights), "test"),
                    seconds=decision.seconds,
                    curve=anytime_curve(decision, merge.branch_scores),
                    weights=tuple(float(w) for w in decision.weights),
                )
                key = (variant.strategy, budget)
                if variant.evaluation == "full":
                    full_trials[key] = decision
                elif variant.evaluation == "exact":
                    run.same_search_as_full = _same_search(decision, full_trials[key])
                runs.append(run)
        best = max(r.curve[-1][1] for r in runs)
        comparison.best[name] = best
        comparison.tolerance[name] = tolerance.of(best)
        for run in runs:
            run.regret = best - run.val
            run.to_tolerance = passes_to_tolerance(run.curve, best, comparison.tolerance[name])
            comparison.runs.append(run)
            if on_run is not None:
                on_run(run)
    return comparison


def _share_same(runs: Sequence[ReplayRun]) -> float | None:
    """Share of exact-evaluation runs that searched as full evaluation did (``None``: none)."""
    checked = [r.same_search_as_full for r in runs if r.same_search_as_full is not None]
    return sum(checked) / len(checked) if checked else None


def _same_search(decision: MergeDecision, full: MergeDecision) -> bool:
    """Whether ``decision`` proposed the candidates ``full`` did and chose its merge."""
    proposed = [t.weights for t in decision.trials] == [t.weights for t in full.trials]
    return proposed and (decision.weights, decision.score) == (full.weights, full.score)


def lattice_size(n_branches: int, divisions: int = 10) -> int:
    return len(simplex_lattice(n_branches, divisions))


def plot_anytime(comparison: ReplayComparison, path: Path) -> None:
    """Regret of the best found vs validation passes, mean ± std over problems, one panel per L."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({n for n, _ in comparison.groups()})
    figure, axes = plt.subplots(1, len(sizes), figsize=(5 * len(sizes), 4), squeeze=False)
    for axis, n in zip(axes[0], sizes, strict=True):
        for _, strategy in [g for g in comparison.groups() if g[0] == n]:
            x, mean, std = comparison.anytime(n, strategy)
            style = "--" if strategy.endswith("+pruned") else "-"
            (line,) = axis.plot(x, mean, style, label=strategy)
            axis.fill_between(
                x, np.maximum(mean - std, 1e-3), mean + std, alpha=0.15, color=line.get_color()
            )
        tolerance = Tolerance.parse(comparison.config["tolerance"])
        axis.axhline(tolerance.value, color="grey", lw=0.8, ls=":")
        axis.set_xscale("log")
        axis.set_yscale("symlog", linthresh=0.05)
        axis.set_xlabel("validation passes (evaluations)")
        axis.set_ylabel(
            "regret of best found (% of best val score)"
            if tolerance.relative
            else "regret of best found (val score)"
        )
        axis.set_title(f"L = {n}")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
