"""The merge search: Λ on the simplex as an inner Optuna study. One entry point
(:func:`search_merge`), one :class:`MergeStrategy` base with one file per strategy under
``strategies/``, exact or pruned candidate evaluation, merge problems as data, and replay.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fm_optuna._lazy import lazy_face

if TYPE_CHECKING:
    from fm_optuna.search._base import (
        Candidates,
        MergeDecision,
        MergeStrategy,
        MergeTrial,
        SearchContext,
    )
    from fm_optuna.search._merge_problem import MergeProblem, MergeProblemWriter
    from fm_optuna.search._replay import load_merge_problems, replay
    from fm_optuna.search._search import search_merge
    from fm_optuna.search.strategies import STRATEGIES, make_strategy

_WHERE = {
    "MergeDecision": "_base",
    "MergeProblem": "_merge_problem",
    "MergeProblemWriter": "_merge_problem",
    "MergeStrategy": "_base",
    "MergeTrial": "_base",
    "STRATEGIES": "strategies",
    "SearchContext": "_base",
    "load_merge_problems": "_replay",
    "make_strategy": "strategies",
    "replay": "_replay",
    "search_merge": "_search",
    "Candidates": "_base",
}
__all__ = [
    "STRATEGIES",
    "Candidates",
    "MergeDecision",
    "MergeProblem",
    "MergeProblemWriter",
    "MergeStrategy",
    "MergeTrial",
    "SearchContext",
    "load_merge_problems",
    "make_strategy",
    "replay",
    "search_merge",
]
__getattr__, __dir__ = lazy_face(__name__, _WHERE, __all__)
