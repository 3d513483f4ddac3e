"""Throughput of shared-study workers: distinct trials finished per minute, N workers over 1.

Runs the outer study of a spec once with one worker and once with ``--workers`` workers (separate
processes, as on separate machines) against one storage, each time on a fresh study of its own,
and reports the ratio of distinct configurations finished per minute. A duplicated configuration
does not count: it is work a second worker wasted.

    python -m fm_optuna.bench_workers studies/digits.toml \\
        --storage postgresql://user:password@127.0.0.1/optuna --trials 8 --workers 2

Goal on a 2-core machine with 2 workers: ≥ 1.7 (``--threads 1`` per worker, the default).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from typing import Any

GOAL = 1.7


def _worker(spec_path: str, name: str, storage: str, trials: int, checkpoints: str) -> None:
    """One worker: the spec's study under ``name`` on ``storage`` until ``trials`` finished."""
    import torch

    from fm_optuna.spec import load_spec
    from fm_optuna.study import Tuner

    torch.set_num_threads(1)
    spec = load_spec(spec_path)
    study = dataclasses.replace(
        spec.study, name=name, n_trials=trials, storage=storage, checkpoint_dir=checkpoints
    )
    Tuner(dataclasses.replace(spec, study=study), device=torch.device("cpu")).run()


def _distinct_finished(storage: str, name: str) -> int:
    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    trials = optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
    done = (TrialState.COMPLETE, TrialState.PRUNED)
    return len({tuple(sorted(t.params.items())) for t in trials if t.state in done})


def measure(spec: str, storage: str, *, trials: int, workers: int) -> dict[str, Any]:
    """Wall time of ``workers`` processes finishing ``trials`` trials of a fresh study."""
    name = f"bench-workers-{workers}-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory(prefix="fm-optuna-bench-") as checkpoints:
        command = [sys.executable, "-m", "fm_optuna.bench_workers", "--worker"]
        command += [spec, name, storage, str(trials), checkpoints]
        started = time.perf_counter()
        processes = [subprocess.Popen(command) for _ in range(workers)]
        codes = [process.wait() for process in processes]
        seconds = time.perf_counter() - started
    if any(codes):
        raise RuntimeError(f"a worker exited with {codes}")
    distinct = _distinct_finished(storage, name)
    return {
        "study": name,
        "seconds": seconds,
        "distinct_trials": distinct,
        "per_minute": 60.0 * distinct / seconds,
    }


def run(spec: str, storage: str, *, trials: int, workers: int) -> dict[str, Any]:
    one = measure(spec, storage, trials=trials, workers=1)
    many = measure(spec, storage, trials=trials, workers=workers)
    return {
        "spec": spec,
        "trials": trials,
        "workers": {"1": one, str(workers): many},
        "ratio": many["per_minute"] / one["per_minute"],
        "goal": GOAL if workers == 2 else None,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fm_optuna.bench_workers", description=__doc__)
    parser.add_argument("spec", nargs="+", help="a study specification (see above)")
    parser.add_argument("--storage", required=False, help="a storage all workers share")
    parser.add_argument("--trials", type=int, default=8, help="finished trials per measurement")
    parser.add_argument("--workers", type=int, default=2, help="workers of the second run")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    if args.worker:
        spec, name, storage, trials, checkpoints = args.spec
        _worker(spec, name, storage, int(trials), checkpoints)
        return 0
    if args.storage is None or len(args.spec) != 1 or args.trials < 1 or args.workers < 2:
        parser.error("give one spec, --storage, --trials ≥ 1 and --workers ≥ 2")
    report = run(args.spec[0], args.storage, trials=args.trials, workers=args.workers)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    for count, item in report["workers"].items():
        print(
            f"{count} worker(s): {item['distinct_trials']} distinct trials in "
            f"{item['seconds']:.1f}s = {item['per_minute']:.2f}/min"
        )
    goal = f" (goal ≥ {GOAL})" if report["goal"] else ""
    print(f"throughput {args.workers} workers / 1: {report['ratio']:.2f}{goal}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
