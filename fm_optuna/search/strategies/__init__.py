"""Merge-search strategies, one per file, registered by name.

Example:
    >>> make_strategy("grid", resolution=0.25).n_trials(n_branches=2, budget=20)
    5
"""

from __future__ import annotations

import inspect
from typing import Any

from fm_optuna.errors import one_of
from fm_optuna.search._base import MergeStrategy
from fm_optuna.search.strategies.binary import Binary
from fm_optuna.search.strategies.cmaes import CmaEs
from fm_optuna.search.strategies.gp import Gp
from fm_optuna.search.strategies.gradient import Gradient
from fm_optuna.search.strategies.greedy import Greedy
from fm_optuna.search.strategies.grid import Grid
from fm_optuna.search.strategies.random import Random
from fm_optuna.search.strategies.tpe import Tpe

STRATEGIES: dict[str, type[MergeStrategy]] = {
    cls.name: cls for cls in (Grid, Binary, Greedy, Tpe, CmaEs, Random, Gp, Gradient)
}


def make_strategy(name: str, **options: Any) -> MergeStrategy:
    """Instantiate a registered strategy; options a strategy does not take are ignored."""
    if name not in STRATEGIES:
        raise one_of("strategy", name, STRATEGIES)
    cls = STRATEGIES[name]
    accepted = inspect.signature(cls).parameters
    return cls(**{k: v for k, v in options.items() if k in accepted and v is not None})


__all__ = [
    "STRATEGIES",
    "Binary",
    "CmaEs",
    "Gp",
    "Gradient",
    "Greedy",
    "Grid",
    "Random",
    "Tpe",
    "make_strategy",
]
