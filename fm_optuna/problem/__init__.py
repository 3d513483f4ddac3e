"""The problem seam: tasks, the :class:`Problem` benchmarks plug into, and its contract check."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fm_optuna._lazy import lazy_face

if TYPE_CHECKING:
    from fm_optuna.problem._checks import check_problem
    from fm_optuna.problem._tasks import Problem, Task, TaskMetrics, describe_problem

_WHERE = {
    "Problem": "_tasks",
    "Task": "_tasks",
    "TaskMetrics": "_tasks",
    "check_problem": "_checks",
    "describe_problem": "_tasks",
}
__all__ = [
    "Problem",
    "Task",
    "TaskMetrics",
    "check_problem",
    "describe_problem",
]
__getattr__, __dir__ = lazy_face(__name__, _WHERE, __all__)
