"""fm_optuna: ForkMerge (Jiang et al., NeurIPS 2023) with Optuna merge search and MLflow tracking.

Bring your own model and tasks as a :class:`Problem`, then:

- :func:`train_forkmerge` — fork → train → merge on your problem; returns the final model, every
  merge decision and the Λ trajectory (optionally logged to MLflow);
- :func:`compare_methods` — STL, EW, the multi-task baselines and ForkMerge on one budget: TG,
  Δm, negative transfer;
- :func:`tune` — create or resume the outer Optuna study over Δt, L, ... (your sampler and
  pruner objects, any RDB storage);
- :func:`search_merge` — only the merge search: Λ on the simplex maximising any ``evaluate(Λ)``.

Each call checks the problem first (:func:`check_problem`); a mistake is one
:class:`ConfigError` before any training. The same problem runs from the command line as
``fm-optuna run --benchmark mypkg.module:build`` or ``benchmark = "mypkg.module:build"`` in a
study file.

Example:
    >>> import fm_optuna
    >>> from examples.diabetes import build
    >>> problem = build(target="progression", seed=0)
    >>> result = fm_optuna.train_forkmerge(
    ...     problem, fm_optuna.ForkMergeConfig(dt=20, total_steps=60, strategy="grid"))
    >>> len(result.lambda_history)
    3
"""

from __future__ import annotations

from importlib import metadata
from typing import TYPE_CHECKING

from fm_optuna._lazy import lazy_face

try:
    __version__ = metadata.version("fm-optuna")
except metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

if TYPE_CHECKING:
    from fm_optuna.api import compare_methods, search_merge, train_forkmerge, tune
    from fm_optuna.config import ForkMergeConfig
    from fm_optuna.core._events import Observer
    from fm_optuna.core._loop import ForkMergeResult
    from fm_optuna.errors import ConfigError, ProblemWarning
    from fm_optuna.problem._checks import check_problem
    from fm_optuna.problem._tasks import Problem, Task

# Loaded on first use: `import fm_optuna` (and `fm-optuna --help`) should not pay for torch.
_WHERE = {
    "Problem": "problem._tasks",
    "Task": "problem._tasks",
    "ForkMergeConfig": "config",
    "ForkMergeResult": "core._loop",
    "Observer": "core._events",
    "ConfigError": "errors",
    "ProblemWarning": "errors",
    "check_problem": "problem._checks",
    "train_forkmerge": "api",
    "compare_methods": "api",
    "tune": "api",
    "search_merge": "api",
}

__all__ = [
    "ConfigError",
    "ForkMergeConfig",
    "ForkMergeResult",
    "Observer",
    "Problem",
    "ProblemWarning",
    "Task",
    "__version__",
    "check_problem",
    "compare_methods",
    "search_merge",
    "train_forkmerge",
    "tune",
]


__getattr__, __dir__ = lazy_face(__name__, _WHERE, __all__)
