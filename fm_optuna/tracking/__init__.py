"""MLflow tracking: the only code in fm_optuna that imports MLflow.

- :func:`open_store` opens (creating on first use) a tracking store and an experiment, failing
  with one line before any training when it cannot;
- :class:`MlflowTracker` is an :class:`~fm_optuna.core.Observer` that logs every branch, every
  merge decision and the Λ trajectory;
- :mod:`fm_optuna.tracking.ui` runs the MLflow UI for a store on 127.0.0.1.

Names are loaded on first use: MLflow takes seconds to import, and the URI helpers
(:mod:`fm_optuna.tracking.uris`) or the UI runner do not need it in this process.
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any

# MLflow 3 sends usage telemetry unless told not to; this tool talks to no one but its store.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

if TYPE_CHECKING:
    from fm_optuna.tracking.observer import MlflowTracker, metric_key
    from fm_optuna.tracking.store import TrackingStore, default_experiment_name, open_store
    from fm_optuna.tracking.study_run import StudyTracking
    from fm_optuna.tracking.uris import DEFAULT_TRACKING_URI, mask_uri, resolve_tracking_uri
    from fm_optuna.tracking.wiring import (
        open_comparison,
        open_run_store,
        run_tracker,
        study_tracking,
    )

_WHERE = {
    "MlflowTracker": "observer",
    "metric_key": "observer",
    "TrackingStore": "store",
    "default_experiment_name": "store",
    "open_store": "store",
    "DEFAULT_TRACKING_URI": "uris",
    "mask_uri": "uris",
    "resolve_tracking_uri": "uris",
    "StudyTracking": "study_run",
    "open_comparison": "wiring",
    "open_run_store": "wiring",
    "run_tracker": "wiring",
    "study_tracking": "wiring",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DEFAULT_TRACKING_URI",
    "MlflowTracker",
    "StudyTracking",
    "TrackingStore",
    "default_experiment_name",
    "mask_uri",
    "metric_key",
    "open_comparison",
    "open_run_store",
    "open_store",
    "resolve_tracking_uri",
    "run_tracker",
    "study_tracking",
]
