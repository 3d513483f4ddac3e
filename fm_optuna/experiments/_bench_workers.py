"""Throughput of shared-study workers: distinct trials finished per minute, N workers over 1.

Runs the outer study of a spec once with one worker and once with ``--workers`` workers (separate
processes, as on separate machines) against one storage, each time on a fresh study of its own,
and reports the ratio of distinct configurations finished per minute. A duplicated configuration
does not count: it is work a second worker wasted. The spec's baselines (trained once per study
after its trials, see ``study._shared_baselines``) are left out: trials are what is counted.
With ``--repeats`` the two measurements alternate and the ratio of the summed rates is reported,
since which trials get pruned, and so what a trial costs, varies from run to run.

    python -m fm_optuna.experiments._bench_workers studies/digits.toml \\
        --storage postgresql://user:password@127.0.0.1/optuna --trials 12 --repeats 2

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

    from fm_optuna.study._spec import load_spec
    from fm_optuna.study._tuner import Tuner

    torch.set_num_threads(1)
    spec = load_spec(spec_path)
    study = dataclasses.replace(
        spec.study,
        name=name,
        n_trials=trials,
        storage=storage,
        checkpoint_dir=checkpoints,
        baselines=(),
    )
    Tuner(dataclasses.replace(spec, study=study), device=torch.device("cpu")).run()


def _finished(storage: str, name: str) -> dict[str, int]:
    """Distinct configurations finished, and how many trials completed or were pruned."""
    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    trials = optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
    done = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    return {
        "distinct_trials": len({tuple(sorted(t.params.items())) for t in done}),
        "complete": sum(t.state == TrialState.COMPLETE for t in done),
        "pruned": sum(t.state == TrialState.PRUNED for t in done),
    }


def measure(spec: str, storage: str, *, trials: int, workers: int) -> dict[str, Any]:
    """Wall time of ``workers`` processes finishing ``trials`` trials of a fresh study."""
    name = f"bench-workers-{workers}-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory(prefix="fm-optuna-bench-") as checkpoints:
        command = [sys.executable, "-m", "fm_optuna.experiments._bench_workers", "--worker"]
        command += [spec, name, storage, str(trials), checkpoints]
        started = time.perf_counter()
        processes = [subprocess.Popen(command) for _ in range(workers)]
        codes = [process.wait() for process in processes]
        seconds = time.perf_counter() - started
    if any(codes):
        raise RuntimeError(f"a worker exited with {codes}")
    finished = _finished(storage, name)
    per_minute = 60.0 * finished["distinct_trials"] / seconds
    return {"study": name, "seconds": seconds, **finished, "per_minute": per_minute}


def run(spec: str, storage: str, *, trials: int, workers: int, repeats: int = 1) -> dict[str, Any]:
    rounds = []
    for _ in range(repeats):  # alternated, so a slow spell of the machine hits both
        one = measure(spec, storage, trials=trials, workers=1)
        many = measure(spec, storage, trials=trials, workers=workers)
        rounds.append(
            {"1": one, str(workers): many, "ratio": many["per_minute"] / one["per_minute"]}
        )

    def rate(count: str) -> float:
        return sum(r[count]["per_minute"] for r in rounds) / len(rounds)

    return {
        "spec": spec,
        "trials": trials,
        "rounds": rounds,
        "ratio": rate(str(workers)) / rate("1"),
        "goal": GOAL if workers == 2 else None,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fm_optuna.experiments._bench_workers", description=__doc__
    )
    parser.add_argument("spec", nargs="+", help="a study specification (see above)")
    parser.add_argument("--storage", required=False, help="a storage all workers share")
    parser.add_argument("--trials", type=int, default=12, help="finished trials per measurement")
    parser.add_argument("--workers", type=int, default=2, help="workers of the second run")
    parser.add_argument("--repeats", type=int, default=1, help="measurements of each (alternated)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    if args.worker:
        spec, name, storage, trials, checkpoints = args.spec
        _worker(spec, name, storage, int(trials), checkpoints)
        return 0
    if args.storage is None or len(args.spec) != 1 or args.trials < 1 or args.workers < 2:
        parser.error("give one spec, --storage, --trials ≥ 1 and --workers ≥ 2")
    if args.repeats < 1:
        parser.error("--repeats should be a positive integer")
    report = run(
        args.spec[0], args.storage, trials=args.trials, workers=args.workers, repeats=args.repeats
    )
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    _print(report)
    return 0


def _print(report: dict[str, Any]) -> None:
    for number, measured in enumerate(report["rounds"], 1):
        for count, item in measured.items():
            if count != "ratio":
                print(
                    f"repeat {number}, {count} worker(s): {item['distinct_trials']} distinct "
                    f"trials ({item['pruned']} pruned) in {item['seconds']:.1f}s = "
                    f"{item['per_minute']:.2f}/min"
                )
        print(f"repeat {number}: ratio {measured['ratio']:.2f}")
    goal = f" (goal ≥ {GOAL})" if report["goal"] else ""
    print(f"throughput, summed over repeats: {report['ratio']:.2f}{goal}")


if __name__ == "__main__":
    sys.exit(main())
