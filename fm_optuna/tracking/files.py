"""One finished MLflow run holding a command's result files (e.g. the task-affinity heat map)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from mlflow.entities import Metric, Param, RunTag

from fm_optuna.tracking.observer import _now_ms
from fm_optuna.tracking.store import TrackingStore
from fm_optuna.tracking.uris import mask_uri


def log_result_run(
    store: TrackingStore,
    name: str,
    *,
    params: Mapping[str, object],
    metrics: Mapping[str, float],
    files: Sequence[Path],
    tags: Mapping[str, str] | None = None,
) -> str:
    """Create a run, log params, metrics and files in one batch each, and finish it."""
    run = store.client.create_run(store.experiment_id, run_name=name, tags=dict(tags or {}))
    run_id = run.info.run_id
    stamp = _now_ms()
    store.client.log_batch(
        run_id,
        metrics=[Metric(key, float(value), stamp, 0) for key, value in metrics.items()],
        params=[Param(key, mask_uri(str(value))[:6000]) for key, value in params.items()],
        tags=[RunTag("fm_optuna.role", "result")],
    )
    for path in files:
        store.client.log_artifact(run_id, str(path))
    store.client.set_terminated(run_id, status="FINISHED")
    return run_id
