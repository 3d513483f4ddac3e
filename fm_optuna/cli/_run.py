"""``fm-optuna run``: STL, EW and ForkMerge (or any methods) on one problem and budget."""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fm_optuna.errors import ConfigError, Interrupted


def _add_problem_options(parser: argparse.ArgumentParser) -> None:
    from fm_optuna.benchmarks import describe_sources
    from fm_optuna.study._spec import DEFAULT_BENCHMARK

    g = parser.add_argument_group("problem")
    g.add_argument(
        "--benchmark",
        default=DEFAULT_BENCHMARK,
        help=f"the problem: {describe_sources()} (e.g. examples.diabetes:build, importable from "
        f"the working directory; default: {DEFAULT_BENCHMARK})",
    )
    g.add_argument(
        "--target",
        default=None,
        help="target task (default: the benchmark's; digits: uci, mnist, synfont, mnistm)",
    )
    g.add_argument(
        "--harmful-aux",
        action="store_true",
        help="digits: add MNIST with random labels sharing the target's head (a noisy source)",
    )
    g.add_argument(
        "--data-dir",
        default=None,
        help="nyuv2, domainnet, aliexpress (required) and qm9 (PyG's raw files instead of "
        "qm9pack's): the local folder holding the data set in its published layout (nothing "
        "is ever downloaded)",
    )
    g.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other option of the benchmark, as under [problem] in a study file (values in "
        "TOML syntax, bare words as text), e.g. --option image_size=32 --option "
        "domains=clipart,sketch; repeatable",
    )
    g.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="per-task batch size (default: the problem's own, e.g. digits 32, qm9 64; 32 for a "
        "factory that requires one)",
    )


def add_training_options(parser: argparse.ArgumentParser) -> None:
    """The problem's flags, then every option of the schema (training, search, runtime)."""
    from fm_optuna.cli._options import add_flags, config_flags, runtime_flags

    _add_problem_options(parser)
    add_flags(parser, [*runtime_flags(), *config_flags()])


def run_config(args: argparse.Namespace, **overrides: Any) -> Any:
    from fm_optuna.cli._options import config_from

    return config_from(args, **overrides)


def benchmark_options(pairs: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings as benchmark options; values are read as TOML (``32``, ``0.1``,
    ``true``, ``["a", "b"]``) and anything TOML cannot read is kept as text (``clipart,sketch``).

    Example:
        >>> benchmark_options(["image_size=32", "domains=clipart,sketch"])
        {'image_size': 32, 'domains': 'clipart,sketch'}
    """
    import tomllib

    from fm_optuna.errors import invalid

    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key.isidentifier():
            raise invalid("option", pair, "KEY=VALUE with KEY a benchmark option, e.g. limit=500")
        try:
            options[key] = tomllib.loads(f"value = {text.strip()}")["value"]
        except tomllib.TOMLDecodeError:
            options[key] = text.strip()
    return options


def run_problem(args: argparse.Namespace) -> Any:
    """The command line's problem on its (first) device."""
    from fm_optuna.cli._common import torch_setup

    return _problem_on(args, torch_setup(args))


def run_replicas(args: argparse.Namespace) -> list[Any]:
    """The same problem on each further device of ``--device`` (one device per branch), built
    by the same factory; none for one device."""
    from fm_optuna.cli._common import torch_devices

    return [_problem_on(args, device) for device in torch_devices(args)[1:]]


def _problem_on(args: argparse.Namespace, device: Any) -> Any:
    from fm_optuna.benchmarks import build_problem, resolve

    source = resolve(args.benchmark)
    extra = _problem_options(args)
    return build_problem(source, target=args.target, seed=args.seed, device=device, **extra)


def _problem_options(args: argparse.Namespace) -> dict[str, Any]:
    """The benchmark options of the command line (what rebuilds the same problem)."""
    from fm_optuna.benchmarks import BENCHMARKS, resolve
    from fm_optuna.errors import invalid

    source = resolve(args.benchmark)
    extra: dict[str, Any] = {}
    if args.batch_size is not None:
        extra["batch_size"] = args.batch_size
    elif _requires_batch_size(source.factory):  # else the problem's own default (qm9: 64)
        extra["batch_size"] = 32
    if args.harmful_aux:
        if not source.accepts("harmful_aux"):
            raise invalid("harmful_aux", True, "used only with --benchmark digits")
        extra["harmful_aux"] = True
    if args.data_dir is not None:
        if not source.accepts("data_dir"):
            readers = [name for name in BENCHMARKS if "data_dir" in resolve(name).options]
            allowed = f"used only with --benchmark {', '.join(readers)} (or a problem taking it)"
            raise invalid("data_dir", args.data_dir, allowed)
        extra["data_dir"] = args.data_dir
    extra.update(benchmark_options(args.option))
    return extra


def _requires_batch_size(factory: Any) -> bool:
    import inspect

    parameter = inspect.signature(factory).parameters.get("batch_size")
    return parameter is not None and parameter.default is inspect.Parameter.empty


def check_plan(problem: Any, config: Any) -> None:
    """Validate L and the merge strategy against the problem before any training starts."""
    from fm_optuna.core._branches import make_plan
    from fm_optuna.problem._tasks import for_plan
    from fm_optuna.search._merge_problem import check_strategy_supported
    from fm_optuna.search.strategies import make_strategy

    planned = for_plan(problem, config.plan)
    check_strategy_supported(planned, make_strategy(config.strategy))
    make_plan(
        "pruned" if config.plan == "joint" else config.plan,
        target=planned.target,
        ranked_auxiliaries=planned.auxiliaries,
        n_branches=config.branches,
        keep=config.keep,
    )


def _mean_std(values: Sequence[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def _print_table(comparisons: list[Any], *, higher_is_better: bool = True) -> None:
    first = comparisons[0]
    target = first.problem["target"]
    metric = first.results[0].target_metric
    print(
        f"benchmark {first.problem.get('benchmark', '-')}  target {target}  metric {metric}  "
        f"T={first.config.total_steps} Δt={first.config.dt} strategy={first.config.strategy}  "
        f"seeds={len(comparisons)}"
    )
    header = (
        f"{'method':<10} {'target val':>16} {'target test':>16} {'TG vs STL':>16} {'seconds':>10}"
    )
    print(header)
    print("-" * len(header))
    for i, result in enumerate(first.results):
        rows = [c.results[i] for c in comparisons]
        tg = [r.tg for r in rows if r.tg is not None]
        print(
            f"{result.method:<10} {_mean_std([r.target_val for r in rows]):>16} "
            f"{_mean_std([r.target_test for r in rows]):>16} {(_mean_std(tg) if tg else '-'):>16} "
            f"{_mean_std([r.seconds for r in rows]):>10}"
        )
    for comparison in comparisons:
        fm = comparison.forkmerge
        if fm is None:
            continue
        names = [b.name for b in fm.branches]
        print(
            f"\nForkMerge seed {comparison.config.seed}: branches {', '.join(names)}; "
            f"ranking {fm.ranking.method} ({', '.join(fm.ranking.order)}); "
            f"final round {fm.final_round}"
        )
        if fm.resumed_from_round:
            print(
                f"  resumed after round {fm.resumed_from_round} (step {fm.resumed_at_step}); "
                f"seconds include {fm.seconds_before_resume:.1f}s before the resume"
            )
        for round_index, (step, decision) in enumerate(
            zip(fm.steps, fm.decisions, strict=True), start=1
        ):
            lam = ", ".join(f"{w:.2f}" for w in decision.weights)
            note = f"  (fallback: {decision.fallback})" if decision.fallback else ""
            value = decision.score if higher_is_better else -decision.score
            stopped = sum(t.state == "PRUNED" for t in decision.trials)
            cost = (
                f" ({stopped} stopped early: {decision.validation_passes:.1f} val passes)"
                if stopped
                else ""
            )
            print(
                f"  round {round_index:>2} step {step:>5}  Λ = [{lam}]  val {metric} {value:.2f}  "
                f"{decision.n_trials} trials{cost} {decision.seconds:.2f}s{note}"
            )


def cmd_run(args: argparse.Namespace) -> int:
    import contextlib

    from fm_optuna.core._checkpoints import check_unlocked, checkpoint_lock, probe_writable

    config = run_config(args)
    methods = tuple(m.strip() for m in args.methods.split(","))
    if args.seeds < 1:
        from fm_optuna.errors import invalid

        raise invalid("seeds", args.seeds, "a positive integer")
    if args.checkpoint and args.seeds > 1:
        from fm_optuna.errors import invalid

        raise invalid("checkpoint", args.checkpoint, "used with a single seed (--seeds 1)")
    problem = run_problem(args)
    check_plan(problem, config)
    replicas = run_replicas(args) if "forkmerge" in methods else []  # only its branches spread
    devices = [problem.device, *(replica.device for replica in replicas)]
    seeds = [args.seed + offset for offset in range(args.seeds)]
    checkpoints = {seed: _checkpoint_path(args, problem, seed) for seed in seeds}
    # Every checkpoint is read and checked before any store is opened: a corrupt or mismatched
    # one is one line and nothing is written.
    snapshots = {
        seed: _resume_snapshot(checkpoints[seed], run_config(args, seed=seed), devices)
        if args.resume
        else None
        for seed in seeds
    }
    # Every place the command writes is probed before anything trains.
    if "forkmerge" in methods:
        for path in checkpoints.values():
            probe_writable(path.parent, parameter="checkpoint")
    if args.save_merge_problems:
        probe_writable(Path(args.save_merge_problems), parameter="save_merge_problems")
    # Two runs never write one checkpoint file unknowingly: checked now, held once the store
    # (the last check) is open.
    forkmerge = checkpoints.values() if "forkmerge" in methods else ()
    for path in forkmerge:
        check_unlocked(path, parameter="checkpoint")
    # tracking (issue #3): after every check (no store for a mistyped command), before any
    # training (a store that cannot be opened is one line, not a lost run).
    store = _open_tracking(args, problem)
    with contextlib.ExitStack() as locks:
        for path in forkmerge:
            locks.enter_context(checkpoint_lock(path, parameter="checkpoint"))
        try:
            return _run_seeds(
                args, (problem, *replicas), config, methods, seeds, checkpoints, snapshots, store
            )
        except Interrupted as error:
            error.next_step = _after_interrupt(checkpoints, methods)
            raise


def _after_interrupt(checkpoints: dict[int, Path], methods: Sequence[str]) -> str:
    """What the next invocation does after a Ctrl-C or SIGTERM of this one."""
    from fm_optuna.core._checkpoints import load_checkpoint

    if "forkmerge" not in methods:
        return "nothing to resume (rerun the command)"
    saved = []
    for seed, path in checkpoints.items():
        try:
            snapshot = load_checkpoint(path)
        except ConfigError:
            snapshot = None
        if snapshot is not None:
            saved.append(f"seed {seed} after merge {snapshot['round']} ({path})")
    if not saved:
        return "no merge was checkpointed yet: rerun the command"
    return "rerun with --resume to continue ForkMerge: " + ", ".join(saved)


def _run_seeds(
    args: argparse.Namespace,
    problems: Sequence[Any],
    config: Any,
    methods: tuple[str, ...],
    seeds: list[int],
    checkpoints: dict[int, Path],
    snapshots: dict[int, Any],
    store: Any,
) -> int:
    from fm_optuna.core._events import EventStream
    from fm_optuna.core._progress import ProgressBars, ProgressLines, progress_stream
    from fm_optuna.experiments._run_methods import run_methods

    problem, *replicas = problems  # the first device's, and one per further device
    comparisons = []
    for seed in seeds:
        events = EventStream([ProgressBars(disable=True if args.json else None)])
        lines = progress_stream(json_output=args.json)
        if lines is not None:
            events.observers.append(ProgressLines(lines))
        if store is not None:  # tracking (issue #3)
            from fm_optuna.tracking import run_tracker

            events.observers.append(run_tracker(store, problem))
        if args.save_merge_problems:
            events.observers.append(_merge_problem_writer(args, problem, events, seed))
        try:
            comparisons.append(
                run_methods(
                    problem,
                    run_config(args, seed=seed),
                    methods,
                    events,
                    checkpoint=checkpoints[seed] if "forkmerge" in methods else None,
                    resume_from=snapshots[seed],
                    replicas=replicas,
                )
            )
        finally:
            events.close()
    if args.json:
        payload = (
            comparisons[0].to_dict()
            if len(comparisons) == 1
            else {"runs": [c.to_dict() for c in comparisons]}
        )
        print(json.dumps(payload, indent=2, default=_json_default))
    else:
        from fm_optuna.problem._tasks import for_plan

        planned = for_plan(problem, config.plan)
        _print_table(comparisons, higher_is_better=planned.task(planned.target).higher_is_better)
    if store is not None:  # tracking (issue #3)
        from fm_optuna.tracking.uris import browse_command

        print(
            f"MLflow: experiment {store.experiment_name} in {store.display_uri}; "
            f"browse it with `{browse_command(store.uri, store.experiment_name)}`",
            file=sys.stderr,
        )
    return 0


def _merge_problem_writer(args: argparse.Namespace, problem: Any, events: Any, seed: int) -> Any:
    """Saves every merge problem of this seed's ForkMerge run (and logs it to MLflow if on)."""
    from fm_optuna.search._merge_problem import MergeProblemWriter, artifact_logger

    source = {
        "benchmark": args.benchmark,
        "target": problem.target,
        "seed": args.seed,
        "options": _problem_options(args),
    }
    folder = Path(args.save_merge_problems) / f"{problem.name}-{problem.target}-seed{seed}"
    return MergeProblemWriter(folder, source, on_saved=artifact_logger(events.observers))


def _checkpoint_path(args: argparse.Namespace, problem: Any, seed: int) -> Path:
    default = f"tracking/checkpoints/run/{problem.name}-{problem.target}-seed{seed}.ckpt"
    return Path(args.checkpoint or default)


def _resume_snapshot(path: Path, config: Any, devices: Sequence[Any]) -> dict[str, Any] | None:
    """The checkpoint ``--resume`` continues from, checked against this run's configuration and
    devices (any list of the kind it was written on)."""
    from fm_optuna.core._checkpoints import load_checkpoint
    from fm_optuna.core._loop import check_resumable

    snapshot = load_checkpoint(path)
    if snapshot is None:
        print(
            f"fm-optuna run: no checkpoint at {path} yet: ForkMerge starts from the beginning",
            file=sys.stderr,
        )
        return None
    try:
        check_resumable(config, snapshot, devices)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
    return snapshot


def _open_tracking(args: argparse.Namespace, problem: Any) -> Any:
    """The MLflow store and experiment of this invocation (``None`` with --no-tracking)."""
    if args.no_tracking:
        return None
    from fm_optuna.tracking import open_run_store

    return open_run_store(args.tracking_uri, problem, args.experiment)


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def add_command(sub: Any) -> None:
    """Register ``run``."""
    from fm_optuna.cli._common import add_tracking

    run = sub.add_parser(
        "run",
        help="train STL, EW and ForkMerge with the same budget and compare them",
        description="Train STL, EW and ForkMerge with the same budget T and print target "
        "validation/test metrics, TG vs STL, the Λ chosen at each merge and wall time.",
    )
    add_training_options(run)
    run.add_argument(
        "--methods",
        default="stl,ew,forkmerge",
        help="comma-separated methods (default: stl,ew,forkmerge)",
    )
    run.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="run seeds seed..seed+N-1 and report mean ± std (default: 1)",
    )
    run.add_argument(
        "--json", action="store_true", help="print the results as JSON instead of a table"
    )
    run.add_argument(
        "--checkpoint",
        default=None,
        help="ForkMerge checkpoint written at every merge (default: "
        "tracking/checkpoints/run/<benchmark>-<target>-seed<seed>.ckpt)",
    )
    run.add_argument(
        "--save-merge-problems",
        metavar="DIR",
        default=None,
        help="save what every merge search saw (branch states, scores, how to rebuild the data) "
        "under DIR/<benchmark>-<target>-seed<seed>/, and as MLflow artifacts when tracking; "
        "replay them with `fm-optuna compare --replay DIR`",
    )
    run.add_argument(
        "--resume",
        action="store_true",
        help="continue ForkMerge after the last merge of its checkpoint (same configuration "
        "required); the baselines are retrained, which is deterministic for a seed",
    )
    # tracking (issue #3)
    add_tracking(
        run.add_argument_group("tracking (MLflow)"),
        experiment="MLflow experiment name (default: fm-optuna/<benchmark>-<target>)",
    )
    run.set_defaults(handler=cmd_run)
