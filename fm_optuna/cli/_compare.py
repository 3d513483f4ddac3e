"""``fm-optuna compare``: merge-search strategies on the same training, or replayed on the
same saved merges (``--replay``)."""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from fm_optuna.cli._common import (
    add_runtime,
    add_spec_overrides,
    add_tracking,
    spec_config,
    torch_setup,
)
from fm_optuna.core._events import Observer
from fm_optuna.core._progress import progress_stream


def cmd_compare(args: argparse.Namespace) -> int:
    from fm_optuna.errors import invalid
    from fm_optuna.experiments._compare_strategies import compare_strategies
    from fm_optuna.study._spec import check_branches_fit, load_spec

    if args.replay is not None:
        if args.spec is not None:
            raise invalid("spec", args.spec, "left out with --replay (the saved merges say it all)")
        return cmd_replay(args)
    if args.spec is None:
        raise invalid("spec", None, "a study specification (or --replay DIR)")
    spec = load_spec(args.spec)
    if args.seeds < 1:
        raise invalid("seeds", args.seeds, "a positive integer")
    device = torch_setup(args, spec)
    strategies = _strategies(args.strategies)  # before anything is built or opened
    config = spec_config(spec, args)
    problem = spec.build_problem(device=device)
    check_branches_fit(spec, problem, config.keep)
    seeds = [spec.seed + i for i in range(args.seeds)]
    tracking = comparison_tracking(
        args, spec, problem, "compare", "strategy", {**config.as_params(), "seeds": seeds}
    )
    out = Path(args.out or Path("tracking") / "compare" / spec.study.name)
    observers = tracking.observers if tracking else None
    if spec.search.save_merge_problems:
        observers = _saving_merge_problems(observers, spec, problem, out / "merge_problems")
    bar, done = _strategy_progress(len(strategies) * len(seeds), json_output=args.json)
    with tracked_comparison(tracking) as files:
        try:
            comparison = compare_strategies(
                problem, config, strategies, seeds, observers=observers, on_run=done
            )
        finally:
            bar.close()
        paths = comparison.save(out)
        files += paths.values()
    if args.json:
        files = {k: str(v) for k, v in paths.items()}
        print(json.dumps({"table": comparison.rows(), "files": files}, indent=2))
    else:
        _print_strategies(spec, problem, config, len(seeds), comparison, paths)
    return 0


def _strategies(text: str) -> list[str]:
    from fm_optuna.errors import invalid
    from fm_optuna.search.strategies import STRATEGIES

    strategies = [s.strip() for s in text.split(",") if s.strip()]
    for strategy in strategies or [""]:
        if strategy not in STRATEGIES:
            raise invalid(
                "strategies", strategy, "a comma-separated list of " + ", ".join(STRATEGIES)
            )
    return strategies


def _strategy_progress(total: int, *, json_output: bool) -> tuple[tqdm, Callable[[Any], None]]:
    """A bar on a terminal, and one line per finished run in a log file or pipe."""
    bar = tqdm(total=total, desc="compare", unit="run", disable=None, file=sys.stderr)
    lines = progress_stream(json_output=json_output)
    # Counted here: a disabled bar (no terminal) never advances its own count.
    finished = itertools.count(1)

    def done(run: Any) -> None:
        n = next(finished)
        bar.update(1)
        bar.set_postfix_str(f"{run.strategy} seed {run.seed}: test {run.test:.2f}")
        if lines is not None:
            print(
                f"[compare {n}/{total}] {run.strategy} seed {run.seed}: val {run.val:.2f} "
                f"test {run.test:.2f} ({run.seconds:.1f} s)",
                file=lines,
                flush=True,
            )

    return bar, done


def _print_strategies(
    spec: Any, problem: Any, config: Any, seeds: int, comparison: Any, paths: dict[str, Path]
) -> None:
    metric = comparison.config["target_metric"]
    print(
        f"{spec.problem.benchmark} target {problem.target}: T={config.total_steps} Δt={config.dt} "
        f"L={config.branches or 'default'} seeds={seeds}  (target {metric}, mean ± std)"
    )
    header = (
        f"{'strategy':<8} {'val':>14} {'test':>14} {'evals/merge':>12} {'merge s/round':>14} "
        f"{'total s':>9} {'L1 to grid Λ':>13}"
    )
    print(header)
    print("-" * len(header))
    for row in comparison.rows():
        distance = "-" if row["l1_from_grid"] is None else f"{row['l1_from_grid']:.3f}"
        print(
            f"{row['strategy']:<8} {row['val_mean']:>7.2f} ± {row['val_std']:<4.2f} "
            f"{row['test_mean']:>7.2f} ± {row['test_std']:<4.2f} "
            f"{row['evaluations_per_merge']:>12.1f} "
            f"{row['merge_seconds_per_round']:>14.3f} {row['total_seconds']:>9.1f} {distance:>13}"
        )
    print(f"saved {paths['csv']}, {paths['json']}, {paths['plot']}")


def _saving_merge_problems(observers: Any, spec: Any, problem: Any, folder: Path) -> Any:
    """Wrap an observer factory so that every compared run also saves its merge problems."""
    from fm_optuna.search._merge_problem import MergeProblemWriter, artifact_logger

    source = {
        "benchmark": spec.problem.benchmark,
        "target": problem.target,
        "seed": spec.seed,
        "options": dict(spec.problem.options),
    }

    def with_writer(value: str, seed: int) -> list[Observer]:
        others = list(observers(value, seed)) if observers else []
        writer = MergeProblemWriter(
            folder / f"{value}-seed{seed}", source, on_saved=artifact_logger(others)
        )
        return [*others, writer]

    return with_writer


def _int_list(name: str, text: str) -> list[int]:
    from fm_optuna.errors import invalid

    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise invalid(name, text, "a comma-separated list of positive integers, e.g. 5,10,20")
    return values


def _float_list(name: str, text: str) -> list[float]:
    from fm_optuna.errors import invalid

    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or not all(math.isfinite(v) and v >= 0 for v in values):
        raise invalid(name, text, "a comma-separated list of non-negative numbers, e.g. 0,2")
    return values


def cmd_replay(args: argparse.Namespace) -> int:
    """``compare --replay DIR``: every strategy on the same saved merge problems."""
    from fm_optuna.benchmarks import build_problem
    from fm_optuna.errors import invalid
    from fm_optuna.search._replay import (
        Tolerance,
        check_strategies,
        find_merge_problems,
        load_merge_problems,
        replay,
    )

    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    check_strategies(strategies)
    budgets = _int_list("budgets", args.budgets)
    prune_sigmas = _float_list("prune_sigmas", args.prune_sigmas)
    tolerance = Tolerance.parse(args.tolerance)
    if args.evaluation_chunks < 2:
        raise invalid("evaluation_chunks", args.evaluation_chunks, "an integer of at least 2")
    paths = find_merge_problems(Path(args.replay))
    device = torch_setup(args)
    store = None
    if not args.no_tracking:
        from fm_optuna.tracking import open_store

        store = open_store(args.tracking_uri, experiment="fm-optuna/compare/replay")

    def build(source: Any) -> Any:
        return build_problem(
            source["benchmark"],
            target=source["target"],
            seed=source["seed"],
            device=device,
            **source.get("options", {}),
        )

    merges = load_merge_problems(paths, build)
    bar, done = _replay_progress()
    try:
        comparison = replay(
            merges,
            strategies,
            budgets,
            exact=args.exact,
            pruned=args.pruned,
            chunks=args.evaluation_chunks,
            prune_sigmas=prune_sigmas,
            tolerance=tolerance,
            lattice_max=args.lattice_max,
            on_run=done,
        )
    finally:
        bar.close()
    out = Path(args.out or Path("tracking") / "compare" / "replay")
    paths_out = comparison.save(out)
    rows = comparison.rows()
    if store is not None:
        _log_replay(store, comparison, rows, list(paths_out.values()))
    if args.json:
        files = {k: str(v) for k, v in paths_out.items()}
        print(json.dumps({"table": rows, "files": files}, indent=2, default=str))
    else:
        _print_replay(args, len(merges), tolerance, rows, paths_out)
    return 0


def _replay_progress() -> tuple[tqdm, Callable[[Any], None]]:
    """A bar on a terminal; one line per search when the output is a log file."""
    bar = tqdm(desc="replay", unit="search", disable=None, file=sys.stderr)

    def done(run: Any) -> None:
        bar.update(1)
        line = f"L={run.n_branches} {run.strategy}@{run.budget}: val {run.val:.4f}"
        bar.set_postfix_str(line)
        if bar.disable:
            print(
                f"replay {run.problem} {line}, {run.passes:.1f} passes", file=sys.stderr, flush=True
            )

    return bar, done


def _print_replay(
    args: argparse.Namespace,
    n_merges: int,
    tolerance: Any,
    rows: list[dict[str, Any]],
    paths_out: dict[str, Path],
) -> None:
    print(
        f"replayed {n_merges} merge problems from {args.replay}; regret in target validation "
        f"score vs the best known Λ (tolerance {tolerance}"
        + (" of the best known score)" if tolerance.relative else ")")
    )
    regret = "regret_pct" if tolerance.relative else "regret"  # in the tolerance's unit
    header = (
        f"{'L':>2} {'strategy':<16} {'budget':>6} {'val passes':>10} "
        f"{'regret %' if tolerance.relative else 'regret':>15} "
        f"{'≤tol':>5} {'passes→tol':>10} {'s/eval':>7} {'test':>14} {'=full':>5}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        reach, same = row["passes_to_tolerance_median"], row["same_search_as_full"]
        print(
            f"{row['L']:>2} {row['strategy']:<16} {row['budget']:>6} {row['val_passes']:>10.1f} "
            f"{row[regret + '_mean']:>7.3f} ± {row[regret + '_std']:<5.3f} "
            f"{row['within_tolerance']:>5.0%} {'-' if reach is None else f'{reach:.1f}':>10} "
            f"{row['seconds_per_evaluation']:>7.3f} "
            f"{row['test_mean']:>7.2f} ± {row['test_std']:<4.2f} "
            f"{'-' if same is None else f'{same:.0%}':>5}"
        )
    if args.exact:
        print("=full: share of the +exact (default) searches that proposed every candidate and")
        print("chose the merge that full evaluation did")
    print(f"saved {paths_out['csv']}, {paths_out['json']}, {paths_out['plot']}")


def _log_replay(store: Any, comparison: Any, rows: list[Any], files: list[Path]) -> None:
    """One finished MLflow run per strategy (metrics per budget), the files on the first."""
    from fm_optuna.tracking.files import log_result_run

    for index, (n, strategy) in enumerate(comparison.groups()):
        metrics = {}
        for row in rows:
            if row["L"] == n and row["strategy"] == strategy:
                b = row["budget"]
                metrics[f"regret_mean/budget_{b}"] = row["regret_mean"]
                metrics[f"regret_std/budget_{b}"] = row["regret_std"]
                metrics[f"regret_pct_mean/budget_{b}"] = row["regret_pct_mean"]
                metrics[f"within_tolerance/budget_{b}"] = row["within_tolerance"]
                metrics[f"val_passes/budget_{b}"] = row["val_passes"]
                metrics[f"test_mean/budget_{b}"] = row["test_mean"]
                metrics[f"seconds_per_evaluation/budget_{b}"] = row["seconds_per_evaluation"]
                if row["same_search_as_full"] is not None:
                    metrics[f"same_search_as_full/budget_{b}"] = row["same_search_as_full"]
        log_result_run(
            store,
            f"replay-L{n}-{strategy}",
            params={"L": n, "strategy": strategy, **comparison.config},
            metrics=metrics,
            files=files if index == 0 else [],
            tags={"strategy": strategy, "L": str(n)},
        )


def comparison_tracking(
    args: argparse.Namespace, spec: Any, problem: Any, kind: str, tag: str, params: dict[str, Any]
) -> Any:
    """The MLflow parent run of this comparison (``None`` with --no-tracking).

    One experiment per comparison and spec (``fm-optuna/<kind>/<study name>``), one parent run
    per invocation; the store is opened here, before any training, so an unreachable store is
    one line and no lost work.
    """
    if args.no_tracking:
        return None
    from fm_optuna.tracking import open_comparison

    return open_comparison(
        args.tracking_uri or spec.study.tracking_uri,
        problem,
        kind=kind,
        study=spec.study.name,
        tag=tag,
        params=params,
    )


@contextlib.contextmanager
def tracked_comparison(tracking: Any) -> Iterator[list[Path]]:
    """The comparison's parent run ends with the command (see ``ComparisonTracking.active``);
    where to browse it is printed once it has."""
    if tracking is None:
        yield []
        return
    with tracking.active() as files:
        yield files
    for line in tracking.browse():
        print(f"browse: {line}", file=sys.stderr)


def add_command(sub: Any) -> None:
    """Register ``compare``."""
    compare = sub.add_parser(
        "compare",
        help="compare merge-search strategies on the same training or on saved merges",
        description="Train ForkMerge once per inner strategy and seed with the same Δt, L "
        "and seeds; print and save a table (CSV, JSON) and a score-vs-cost plot. With --replay "
        "DIR, run every strategy on exactly the same saved merge problems (see `fm-optuna run "
        "--save-merge-problems`) at several budgets: regret vs the best known Λ, anytime "
        "curves, evaluations to come within --tolerance, seconds per evaluation, test score.",
    )
    compare.add_argument(
        "spec", nargs="?", default=None, help="a study specification, e.g. studies/digits.toml"
    )
    compare.add_argument(
        "--strategies",
        default="grid,binary,greedy,tpe,cmaes,random",
        help="comma-separated strategies (default: grid,binary,greedy,tpe,cmaes,random; "
        "also gp, gradient)",
    )
    g = compare.add_argument_group("replay (saved merge problems)")
    g.add_argument(
        "--replay", metavar="DIR", default=None, help="replay the merge problems saved under DIR"
    )
    g.add_argument(
        "--budgets", default="5,10,20,40", help="inner-study budgets (default: 5,10,20,40)"
    )
    g.add_argument(
        "--exact",
        action="store_true",
        help="also run each strategy with the default evaluation of a live run (variants "
        "strategy+exact: candidates that can change neither the decision nor the sampler's "
        "proposals are stopped), and check that it searched as full evaluation did",
    )
    g.add_argument(
        "--pruned", action="store_true", help="also run each strategy with pruned evaluation"
    )
    g.add_argument(
        "--evaluation-chunks",
        type=int,
        default=4,
        help="validation parts of an exact or pruned evaluation (4)",
    )
    g.add_argument(
        "--prune-sigmas",
        default="2",
        help="standard errors a pruned candidate must trail the best one by (default: 2); "
        "a comma-separated list compares several (variants strategy+pruned<z>σ)",
    )
    g.add_argument(
        "--tolerance",
        default="0.1",
        help="regret counted as reaching the best: in target score units (default 0.1 = 0.1 pp "
        "of accuracy), or with %% relative to the best known score (e.g. 1%% for an MAE)",
    )
    g.add_argument(
        "--lattice-max",
        type=int,
        default=300,
        help="run grid's 0.1 lattice only up to this many points (default: 300, i.e. L ≤ 4)",
    )
    compare.add_argument("--seeds", type=int, default=3, help="seeds per strategy (default: 3)")
    add_spec_overrides(compare, ("dt", "branches", "cut", "keep"))
    compare.add_argument(
        "--out", default=None, help="output folder (default: tracking/compare/<study name>)"
    )
    add_tracking(compare)
    add_runtime(compare)
    compare.set_defaults(handler=cmd_compare)
