"""``fm-optuna bench``: what forking, merging and search cost, and the threads policy."""

from __future__ import annotations

import argparse
import json
from typing import Any

from fm_optuna.cli._run import (
    add_training_options,
    benchmark_options,
    check_plan,
    run_config,
    run_problem,
)


def cmd_bench(args: argparse.Namespace) -> int:
    from fm_optuna.experiments._bench import run_bench

    if args.measure_input:
        return _measure_input(args)
    config = run_config(args)
    problem = run_problem(args)
    check_plan(problem, config)
    if args.methods:
        from fm_optuna.experiments._bench_methods import measure_methods, methods_text

        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        _check_methods(methods)
        costs = measure_methods(problem, config, methods, repeats=max(args.repeats, 1))
        print(json.dumps(costs, indent=2) if args.json else methods_text(costs))
        return 0
    if args.measure_threads:
        from fm_optuna.experiments._bench_threads import measure_threads, threads_text

        threads = measure_threads(problem, config)
        print(json.dumps(threads, indent=2) if args.json else threads_text(threads))
        return 0
    report = run_bench(problem, config, repeats=args.repeats)
    print(json.dumps(report, indent=2) if args.json else report_text(report))
    return 0


def _measure_input(args: argparse.Namespace) -> int:
    """DomainNet's steps per second, inline decoding against the pipeline (no --benchmark:
    a generated folder of JPEGs, or --data-dir)."""
    from fm_optuna.cli._common import torch_setup
    from fm_optuna.errors import invalid
    from fm_optuna.experiments._bench_input import input_text, measure_input

    if args.input_steps < 1:
        raise invalid("input_steps", args.input_steps, "a positive integer")
    report = measure_input(
        device=torch_setup(args),
        data_dir=args.data_dir,
        options=benchmark_options(args.option),
        batch_size=args.batch_size or 8,
        steps=args.input_steps,
        repeats=max(args.repeats, 1),
        seed=args.seed,
    )
    print(json.dumps(report, indent=2) if args.json else input_text(report))
    return 0


def _check_methods(methods: list[str]) -> None:
    from fm_optuna.baselines import BASELINES
    from fm_optuna.errors import invalid

    for name in methods or [""]:
        if name not in BASELINES:
            raise invalid(
                "methods", name, "comma-separated baselines among " + ", ".join(BASELINES)
            )


def report_text(report: dict[str, Any]) -> str:
    lines = [f"fm-optuna bench: {report['setup']}"]
    for key, item in report["ratios"].items():
        goal = (
            f"  (goal ≤ {item['goal']:.2f}: "
            f"{'met' if item['value'] <= item['goal'] else 'NOT met'})"
            if item.get("goal")
            else ""
        )
        lines.append(f"  {key:<34} {item['value']:.3f}{goal}   {item['what']}")
    lines.append("  seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in report["seconds"].items()))
    return "\n".join(lines)


def add_command(sub: Any) -> None:
    """Register ``bench``."""

    bench = sub.add_parser(
        "bench",
        help="measure what ForkMerge's forking, merging and search cost",
        description="Measure, in one process: ForkMerge wall time over training its L branches "
        "alone (goal ≤ 1.10), the share spent in merge search (goal ≤ 5%), ForkMerge "
        "over EW, and the ranking pre-pass cost.",
    )
    add_training_options(bench)
    bench.set_defaults(dt=200, total_steps=1500, branches=3)
    bench.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="repeat each measurement and keep the fastest (default: 1)",
    )
    bench.add_argument("--json", action="store_true", help="print the report as JSON")
    bench.add_argument(
        "--methods",
        default=None,
        help="instead, measure each baseline's seconds per step relative to EW (30 steps, "
        "--repeats interleaved repetitions, the fastest kept), e.g. itmtl,itmtl-fo,pcgrad",
    )
    bench.add_argument(
        "--measure-threads",
        action="store_true",
        help="instead, measure the threads policy: the branches trained with 1 intra-op thread "
        "and with every core, on an idle machine and with one core kept busy",
    )
    bench.add_argument(
        "--measure-input",
        action="store_true",
        help="instead, measure DomainNet's input pipeline: steps per second of its ResNet-18 "
        "with images decoded inline and by background workers, and decoding alone by threads "
        "and by processes, on a generated folder of JPEGs (or --data-dir; --option "
        "image_size=224, workers=2, prefetch=2; --batch-size 8 per domain)",
    )
    bench.add_argument(
        "--input-steps",
        type=int,
        default=10,
        help="training steps per measurement of --measure-input (default: 10)",
    )
    bench.set_defaults(handler=cmd_bench)
