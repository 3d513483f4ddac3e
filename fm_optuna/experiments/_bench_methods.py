"""Seconds per training step of each method relative to EW, on the same problem and batches.

``fm-optuna bench --methods stl,ew,itmtl,itmtl-fo`` prints it: what a gradient-manipulating
baseline (IT-MTL's lookahead candidates, PCGrad's projections, …) costs on top of EW's one
backward. Each method trains ``steps`` steps from the same seeded model and data stream; the
repetitions are interleaved and the fastest kept, so a load that comes and goes blurs every
method alike.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

from fm_optuna.baselines import make_baseline
from fm_optuna.config import ForkMergeConfig
from fm_optuna.core._training import (
    data_generator,
    make_optimization,
    rule_parameters,
    seeded_model,
    train,
)
from fm_optuna.problem._tasks import Problem

REFERENCE = "ew"


def _seconds(problem: Problem, config: ForkMergeConfig, method: str, steps: int) -> float:
    model = seeded_model(problem, config.seed)
    rule = make_baseline(method).rule_for(problem, config)
    optimization = make_optimization(model, config, rule_parameters(rule))
    bind = getattr(rule, "bind_optimizer", None)
    if bind is not None:
        bind(optimization.optimizer)
    started = time.perf_counter()
    train(
        model,
        optimization,
        problem,
        rule,
        steps=steps,
        generator=data_generator(problem, config.seed, 0),
        log_every=steps,
    )
    return time.perf_counter() - started


def measure_methods(
    problem: Problem,
    config: ForkMergeConfig,
    methods: Sequence[str],
    *,
    steps: int = 30,
    repeats: int = 3,
) -> dict[str, Any]:
    """The fastest of ``repeats`` interleaved timings of ``steps`` steps per method, and each
    method's seconds per step over EW's (EW is always measured)."""
    names = list(dict.fromkeys([REFERENCE, *methods]))
    short = dataclasses.replace(config, total_steps=steps, dt=min(config.dt, steps))
    best: dict[str, float] = {}
    for _ in range(repeats):
        for name in names:
            seconds = _seconds(problem, short, name, steps)
            best[name] = min(best.get(name, seconds), seconds)
    return {
        "steps": steps,
        "repeats": repeats,
        "seconds_per_step": {name: best[name] / steps for name in names},
        "over_ew": {name: best[name] / best[REFERENCE] for name in names},
    }


def methods_text(report: dict[str, Any]) -> str:
    lines = [
        f"seconds per step relative to EW (fastest of {report['repeats']} interleaved "
        f"repetitions of {report['steps']} steps):"
    ]
    for name, ratio in report["over_ew"].items():
        per_step = 1000 * report["seconds_per_step"][name]
        lines.append(f"  {name:<14} {ratio:6.2f}×   {per_step:8.1f} ms/step")
    return "\n".join(lines)
