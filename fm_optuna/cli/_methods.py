"""``fm-optuna compare-methods`` and ``fm-optuna task-affinity``: commands that read a study spec.

``compare-methods`` trains every requested method (baselines and ForkMerge) with the spec's budget
on one or more targets and seeds, and reports per-task metrics, TG vs STL, Δm and negative-transfer
flags. ``task-affinity`` measures the lookahead inter-task affinity matrix (heat map) and compares
the affinity ranking of the auxiliaries with the official pre-pass: cost and agreement.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import json
import statistics
import sys
import textwrap
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
from fm_optuna.cli._compare import comparison_tracking, tracked_comparison
from fm_optuna.core._progress import progress_stream


def _load(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """The spec, its configuration with the command-line overrides, and the torch device."""
    from fm_optuna.errors import invalid
    from fm_optuna.study._spec import load_spec

    spec = load_spec(args.spec)
    if args.seeds < 1:
        raise invalid("seeds", args.seeds, "a positive integer")
    overrides: dict[str, Any] = {}
    if args.total_steps is not None and args.dt is None and spec.base.dt > args.total_steps:
        overrides["dt"] = args.total_steps  # a shorter budget keeps Δt within it
    config = spec_config(spec, args, **overrides)
    return spec, config, torch_setup(args, spec)


def _problems(spec: Any, text: str | None, device: Any) -> list[Any]:
    """The spec's problem for each requested target (``all``: every task the module declares as
    a target, else every task of the built problem)."""
    from fm_optuna.benchmarks import resolve
    from fm_optuna.errors import one_of

    if text is None:
        return [spec.build_problem(device=device)]
    first = None
    allowed = resolve(spec.problem.benchmark).targets
    if allowed is None:  # only the built problem knows its tasks
        first = spec.build_problem(device=device)
        allowed = first.task_names
    names = list(allowed) if text == "all" else [t.strip() for t in text.split(",") if t.strip()]
    for name in names:
        if name not in allowed:
            raise one_of("targets", name, allowed)
    return [
        first
        if first is not None and name == first.target
        else spec.build_problem(device=device, target=name)
        for name in dict.fromkeys(names)
    ]


def _fmt(mean: float | None, std: float | None = None, *, scale: float = 1.0) -> str:
    if mean is None:
        return "-"
    if std is None or std == 0:
        return f"{scale * mean:.2f}"
    return f"{scale * mean:.2f} ± {scale * std:.2f}"


def _flag(value: bool | None) -> str:
    return "-" if value is None else ("yes" if value else "no")


def cmd_compare_methods(args: argparse.Namespace) -> int:
    from fm_optuna._results import finite
    from fm_optuna.experiments._compare_methods import compare_methods, parse_methods
    from fm_optuna.study._spec import check_branches_fit

    methods = parse_methods(args.methods)  # a bad name fails before anything is built
    spec, config, device = _load(args)
    problems = _problems(spec, args.targets, device)
    if "forkmerge" in methods:
        check_branches_fit(spec, problems[0], config.keep)
    seeds = [spec.seed + i for i in range(args.seeds)]
    tracking = comparison_tracking(
        args,
        spec,
        problems[0],
        "compare-methods",
        "target",
        {**config.as_params(), "methods": ",".join(methods), "seeds": seeds},
    )
    bar = tqdm(
        total=len(problems) * len(seeds) * len(methods),
        desc="compare-methods",
        unit="run",
        disable=None,
        file=sys.stderr,
    )
    lines = progress_stream(json_output=args.json)
    # Counted here: a disabled bar (no terminal) never advances its own count.
    finished, bar_total = itertools.count(1), bar.total

    def done(target: str, seed: int, method: str, summary: Any) -> None:
        n = next(finished)
        bar.update(1)
        bar.set_postfix_str(f"{target} seed {seed}: {method} test {summary.target_test:.2f}")
        if lines is not None:
            print(
                f"[compare-methods {n}/{bar_total}] {target} seed {seed}: {method} val "
                f"{summary.target_val:.2f} test {summary.target_test:.2f}",
                file=lines,
                flush=True,
            )

    with tracked_comparison(tracking) as files:
        try:
            report = compare_methods(
                problems,
                config,
                methods,
                seeds,
                references=args.references,
                observers=tracking.observers if tracking else None,
                on_method=done,
            )
        finally:
            bar.close()
        out = Path(args.out or Path("tracking") / "compare-methods" / spec.study.name)
        paths = report.save(out)
        files += paths.values()
    rows, snt = report.rows(), report.snt()
    if args.json:
        payload = {
            "table": rows,
            "snt": snt,
            "across_targets": report.across_targets(),
            "files": {key: str(path) for key, path in paths.items()},
        }
        print(json.dumps(finite(payload), indent=2))
        return 0
    _print_methods(report, rows, snt, config, spec)
    print(f"saved {paths['csv']}, {paths['json']}")
    return 0


def _print_methods(
    report: Any, rows: list[dict[str, Any]], snt: Any, config: Any, spec: Any
) -> None:
    reference = (
        "STL trained for each task" if report.config["references"] == "tasks" else "STL (target)"
    )
    for target in report.targets:
        block = [row for row in rows if row["target"] == target]
        metric = block[0]["metric"]
        print(
            f"\n{spec.problem.benchmark} target {target}: T={config.total_steps} Δt={config.dt} "
            f"seeds={block[0]['seeds']}  (test {metric}, mean ± std; reference: {reference})"
        )
        header = (
            f"{'method':<10} {'kind':<16} {'target test':>15} {'TG vs STL':>15} "
            f"{'Δm %':>15} {'WNT':>4} {'seconds':>8}"
        )
        print(header)
        print("-" * len(header))
        for row in block:
            print(
                f"{row['method']:<10} {row['kind']:<16} "
                f"{_fmt(row['target_test_mean'], row['target_test_std']):>15} "
                f"{_fmt(row['tg_mean'], row['tg_std']):>15} "
                f"{_fmt(row['delta_m_mean'], row['delta_m_std'], scale=100):>15} "
                f"{_flag(row['wnt']):>4} {_fmt(row['seconds_mean']):>8}"
            )
        tasks = [key.split("/", 1)[1] for key in block[0] if key.startswith("tg/")]
        weak = {
            task: [r["method"] for r in block if r[f"wnt/{task}"]]
            for task in tasks
            if any(r[f"wnt/{task}"] for r in block)
        }
        if weak:
            print(
                "WNT (TG < 0) per task: "
                + "; ".join(f"{task}: {', '.join(names)}" for task, names in weak.items())
            )
        print(
            "SNT (every multi-task weighting run has TG < 0): "
            + ", ".join(f"{task} {_flag(flag)}" for task, flag in snt[target].items())
        )
    across = report.across_targets()
    if across:
        print(f"\nΔm over the targets {', '.join(report.targets)} (relative gain on each target)")
        for item in across:
            print(f"  {item['method']:<10} {_fmt(item['delta_m_targets'], scale=100):>10} %")


def cmd_task_affinity(args: argparse.Namespace) -> int:
    """Rank the auxiliaries by the lookahead affinity and by the pre-pass, for each seed:
    measure, summarise, save (and log), print."""
    from fm_optuna._results import finite
    from fm_optuna.errors import invalid

    spec, config, device = _load(args)
    problem = spec.build_problem(device=device)
    if len(problem.auxiliaries) < 2:
        raise invalid("spec", spec.path, "a problem with at least two auxiliary tasks to rank")
    steps = args.affinity_steps or config.ranking_steps or config.dt
    seeds = [spec.seed + i for i in range(args.seeds)]
    out = Path(args.out or Path("tracking") / "task-affinity" / spec.study.name)
    store = _affinity_store(args, spec)  # before any training: a bad store costs nothing
    records = [
        _affinity_of_seed(problem, config, seed, steps, args, out)
        for seed in tqdm(seeds, desc="task-affinity", unit="seed", disable=None, file=sys.stderr)
    ]
    summary = _affinity_summary(spec, problem, records, steps, args.lookahead, out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "affinity.json").write_text(json.dumps(finite(summary), indent=2))
    if store is not None:
        _log_affinity(store, spec, problem, summary, steps, seeds, args.lookahead, out)
    if args.json:
        print(json.dumps(finite(summary), indent=2))
    else:
        _print_affinity(spec, problem, config, summary, steps, args.lookahead, out)
    return 0


def _affinity_store(args: argparse.Namespace, spec: Any) -> Any:
    if args.no_tracking:
        return None
    from fm_optuna.tracking import open_store

    return open_store(
        args.tracking_uri or spec.study.tracking_uri,
        experiment=f"fm-optuna/task-affinity/{spec.study.name}",
    )


def _affinity_of_seed(
    problem: Any, config: Any, seed: int, steps: int, args: argparse.Namespace, out: Path
) -> dict[str, Any]:
    """One seed: the pre-pass and affinity rankings, their agreement, the heat map."""
    from fm_optuna.core._affinity import plot_affinity, task_affinity
    from fm_optuna.core._ranking import prepass_ranking, rank_by_affinity, ranking_agreement
    from fm_optuna.core._training import seeded_model

    seeded = dataclasses.replace(config, seed=seed)
    initial = copy.deepcopy(seeded_model(problem, seed).state_dict())
    prepass = prepass_ranking(problem, seeded, initial)
    affinity = rank_by_affinity(problem, dataclasses.replace(seeded, ranking_steps=steps), initial)
    matrix = task_affinity(
        problem, seeded, initial, steps=steps, every=args.every, lookahead=args.lookahead
    )
    plot_affinity(matrix.matrix, matrix.tasks, out / f"affinity_seed{seed}.png")

    def ranking(result: Any, ranking_steps: int) -> dict[str, Any]:
        return {
            "order": list(result.order),
            "relevance": list(result.relevance or ()),
            "seconds": result.seconds,
            "steps": ranking_steps,
        }

    return {
        "seed": seed,
        "prepass": ranking(prepass, config.ranking_steps or config.dt),
        "affinity": ranking(affinity, steps),
        "agreement": ranking_agreement(prepass.order, affinity.order).__dict__,
        "matrix": matrix.to_dict(),
    }


_AFFINITY_METRICS = (
    "prepass_seconds_mean",
    "affinity_seconds_mean",
    "kendall_tau_mean",
    "same_first_rate",
    "identical_rate",
)


def _affinity_summary(
    spec: Any, problem: Any, records: list[dict[str, Any]], steps: int, lookahead: str, out: Path
) -> dict[str, Any]:
    """The seeds' mean heat map (plotted) and the rankings' costs and agreement."""
    import numpy as np

    from fm_optuna.core._affinity import plot_affinity

    mean = np.mean([np.array(r["matrix"]["matrix"], dtype=float) for r in records], axis=0)
    plot_affinity(
        mean,
        problem.task_names,
        out / "affinity.png",
        title=f"Z(i → j), mean over {len(records)} seed(s), {steps} steps",
    )

    def average(value: Any) -> float:
        return statistics.mean(float(value(r)) for r in records)

    return {
        "benchmark": spec.problem.benchmark,
        "target": problem.target,
        "tasks": list(problem.task_names),
        "lookahead": lookahead,
        "mean_matrix": mean.tolist(),
        "prepass_seconds_mean": average(lambda r: r["prepass"]["seconds"]),
        "affinity_seconds_mean": average(lambda r: r["affinity"]["seconds"]),
        "kendall_tau_mean": average(lambda r: r["agreement"]["kendall_tau"]),
        "same_first_rate": average(lambda r: r["agreement"]["same_first"]),
        "identical_rate": average(lambda r: r["prepass"]["order"] == r["affinity"]["order"]),
        "seeds": records,
        "files": {"heatmap": str(out / "affinity.png"), "json": str(out / "affinity.json")},
    }


def _log_affinity(
    store: Any,
    spec: Any,
    problem: Any,
    summary: dict[str, Any],
    steps: int,
    seeds: list[int],
    lookahead: str,
    out: Path,
) -> None:
    """The heat maps and the summary as one MLflow run (the paper's Fig. 8/14)."""
    from fm_optuna.tracking.files import log_result_run

    log_result_run(
        store,
        f"task-affinity-{problem.target}",
        params={
            "benchmark": spec.problem.benchmark,
            "target": problem.target,
            "steps": steps,
            "seeds": len(seeds),
            "lookahead": lookahead,
        },
        metrics={key: summary[key] for key in _AFFINITY_METRICS},
        files=[
            out / "affinity.png",
            out / "affinity.json",
            *(out / f"affinity_seed{seed}.png" for seed in seeds),
        ],
    )


def _print_affinity(
    spec: Any,
    problem: Any,
    config: Any,
    summary: dict[str, Any],
    steps: int,
    lookahead: str,
    out: Path,
) -> None:
    print(
        f"{spec.problem.benchmark} target {problem.target}: rankings of "
        f"{', '.join(problem.auxiliaries)}"
        f" (pre-pass: {config.ranking_steps or config.dt} steps per auxiliary; affinity: one joint"
        f" run of {steps} steps, {lookahead} lookahead)"
    )
    for r in summary["seeds"]:
        print(
            f"  seed {r['seed']}: prepass {','.join(r['prepass']['order'])} "
            f"({r['prepass']['seconds']:.1f}s)  affinity {','.join(r['affinity']['order'])} "
            f"({r['affinity']['seconds']:.1f}s)  Kendall τ {r['agreement']['kendall_tau']:.2f}"
        )
    print(
        f"mean cost: prepass {summary['prepass_seconds_mean']:.1f}s, affinity "
        f"{summary['affinity_seconds_mean']:.1f}s; identical orders in "
        f"{summary['identical_rate']:.0%} of seeds, same first in {summary['same_first_rate']:.0%},"
        f" mean Kendall τ {summary['kendall_tau_mean']:.2f}"
    )
    names, mean = problem.task_names, summary["mean_matrix"]
    print("mean Z(i → j) × 100 (rows: source i, columns: affected j)")
    print(" " * 12 + "".join(f"{n:>12}" for n in names))
    for i, name in enumerate(names):
        print(f"{name:>12}" + "".join(f"{100 * v:>12.2f}" for v in mean[i]))
    print(f"saved {out / 'affinity.json'}, {out / 'affinity.png'}")


def _add_budget(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", help="a study specification, e.g. studies/digits.toml")
    parser.add_argument("--seeds", type=int, default=1, help="seeds study.seed.. (default: 1)")
    add_spec_overrides(parser, ("total_steps", "dt"))


def _methods_table() -> str:
    """Every method ``--methods`` accepts, with its kind and where it comes from."""
    from fm_optuna.baselines import BASELINES

    rows = [("forkmerge", "target-specific", "Jiang et al., 2023 (ForkMerge, Alg. 1-4)")]
    rows += [(name, cls.kind, cls.reference or "-") for name, cls in BASELINES.items()]
    lines = [f"  {name:<13} {kind:<16} {reference}" for name, kind, reference in rows]
    return "methods:\n" + "\n".join(lines)


def add_command(sub: Any) -> None:
    """Register ``compare-methods`` and ``task-affinity`` on the main parser's subcommands."""
    from fm_optuna.core._affinity import LOOKAHEADS
    from fm_optuna.experiments._run_methods import METHODS, REFERENCES

    compare = sub.add_parser(
        "compare-methods",
        help="compare ForkMerge with the multi-task baselines: TG, Δm, negative transfer",
        description=textwrap.fill(
            "Train every method with the spec's budget and seeds; print per-task test "
            "metrics, the target's TG against STL, Δm (Appendix C.1) and weak/strong negative "
            "transfer per task; save CSV and JSON."
        ),
        epilog=_methods_table(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_budget(compare)
    add_spec_overrides(compare, ("branches", "cut", "keep"))
    compare.add_argument(
        "--methods",
        default="all",
        help=f"comma-separated methods or all (default: all = {', '.join(METHODS)})",
    )
    compare.add_argument(
        "--targets",
        default=None,
        help="comma-separated targets or all (default: the spec's); with several, Δm is also "
        "averaged over the targets",
    )
    compare.add_argument(
        "--references",
        default="tasks",
        choices=REFERENCES,
        help="Δm reference: tasks = STL trained for every task (default), target = STL only",
    )
    compare.add_argument(
        "--out", default=None, help="output folder (default: tracking/compare-methods/<study>)"
    )
    add_tracking(compare)
    add_runtime(compare)
    compare.set_defaults(handler=cmd_compare_methods)

    affinity = sub.add_parser(
        "task-affinity",
        help="lookahead inter-task affinity heat map; affinity vs pre-pass ranking",
        description="Measure Z(i → j) of Fifty et al. during a short joint run (heat map), and "
        "rank the auxiliaries by it and by the official pre-pass: seconds and agreement.",
    )
    _add_budget(affinity)
    affinity.add_argument(
        "--affinity-steps",
        type=int,
        default=None,
        help="steps of the joint run (default: the pre-pass's, i.e. Δt)",
    )
    affinity.add_argument(
        "--every", type=int, default=1, help="measure every N steps of the heat-map run"
    )
    affinity.add_argument(
        "--lookahead", default="adam", choices=LOOKAHEADS, help="lookahead step (default: adam)"
    )
    affinity.add_argument(
        "--out", default=None, help="output folder (default: tracking/task-affinity/<study>)"
    )
    add_tracking(affinity)
    add_runtime(affinity)
    affinity.set_defaults(handler=cmd_task_affinity)
