"""The measurement behind the threads policy: one intra-op thread against all of the cores,
on an idle machine and with a second process keeping one core busy.

``fm-optuna bench --measure-threads`` prints it. The policy it supports
(:class:`~fm_optuna.config.RuntimeOptions`, 1 thread by default) is the one every door applies.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import torch

from fm_optuna.config import ForkMergeConfig
from fm_optuna.experiments._bench import train_branches_alone
from fm_optuna.problem._tasks import Problem


@contextlib.contextmanager
def _one_core_busy() -> Iterator[None]:
    """Another process spinning on one core, as a second worker or a test suite would."""
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield
    finally:
        spinner.kill()
        spinner.wait()


def measure_threads(
    problem: Problem, config: ForkMergeConfig, *, steps: int = 100
) -> dict[str, Any]:
    """Seconds to train the plan's branches ``steps`` steps each, by load and thread count."""
    cores = len(os.sched_getaffinity(0))
    counts = sorted({1, cores})
    short = dataclasses.replace(config, total_steps=steps, dt=min(config.dt, steps))
    before = torch.get_num_threads()
    seconds: dict[str, float] = {}
    try:
        for load in ("idle", "busy"):
            with _one_core_busy() if load == "busy" else contextlib.nullcontext():
                for threads in counts:
                    torch.set_num_threads(threads)
                    seconds[f"{load}, {threads} thread(s)"] = train_branches_alone(problem, short)
    finally:
        torch.set_num_threads(before)
    ratios = {
        load: seconds[f"{load}, {cores} thread(s)"] / seconds[f"{load}, 1 thread(s)"]
        for load in ("idle", "busy")
    }
    return {"cores": cores, "steps": steps, "seconds": seconds, "all_over_one": ratios}


def threads_text(report: dict[str, Any]) -> str:
    lines = [
        f"threads ({report['cores']} cores, the branches × {report['steps']} steps; "
        "seconds, then all cores / 1 thread):"
    ]
    lines += [f"  {name:<24} {value:.2f} s" for name, value in report["seconds"].items()]
    lines += [
        f"  {load:<24} {ratio:.2f}× (<1: all cores faster)"
        for load, ratio in report["all_over_one"].items()
    ]
    return "\n".join(lines)
