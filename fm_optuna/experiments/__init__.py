"""Experiments over the core: methods compared on one budget, merge strategies compared on the
same training or the same saved merges, and the benches.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fm_optuna._lazy import lazy_face

if TYPE_CHECKING:
    from fm_optuna.experiments._bench import run_bench
    from fm_optuna.experiments._compare_methods import MethodsComparison, compare_methods
    from fm_optuna.experiments._compare_strategies import StrategyComparison, compare_strategies
    from fm_optuna.experiments._run_methods import Comparison, run_methods

_WHERE = {
    "Comparison": "_run_methods",
    "MethodsComparison": "_compare_methods",
    "StrategyComparison": "_compare_strategies",
    "compare_methods": "_compare_methods",
    "compare_strategies": "_compare_strategies",
    "run_bench": "_bench",
    "run_methods": "_run_methods",
}
__all__ = [
    "Comparison",
    "MethodsComparison",
    "StrategyComparison",
    "compare_methods",
    "compare_strategies",
    "run_bench",
    "run_methods",
]
__getattr__, __dir__ = lazy_face(__name__, _WHERE, __all__)
