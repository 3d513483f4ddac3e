"""Comparison methods on the same training loop, one small file each, registered by name.

A baseline is an :class:`~fm_optuna.baselines.base.Baseline`: it says which update rule trains
the model at each step; :func:`~fm_optuna.baselines.base.run_baseline` does the rest.
"""

from __future__ import annotations

from fm_optuna.baselines.base import Baseline, run_baseline
from fm_optuna.baselines.ew import EqualWeighting
from fm_optuna.baselines.stl import SingleTask
from fm_optuna.errors import one_of

BASELINES: dict[str, type[Baseline]] = {cls.name: cls for cls in (SingleTask, EqualWeighting)}


def make_baseline(name: str) -> Baseline:
    if name not in BASELINES:
        raise one_of("method", name, BASELINES)
    return BASELINES[name]()


__all__ = ["BASELINES", "Baseline", "EqualWeighting", "SingleTask", "make_baseline", "run_baseline"]
