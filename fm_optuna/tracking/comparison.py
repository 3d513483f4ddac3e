"""MLflow for ``compare`` and ``compare-methods``: one parent run per invocation.

Every compared run (a strategy's or a method's, with ForkMerge's branch runs below it) hangs
under the invocation's parent run, so one row of the runs table opens the whole comparison. The
parent ends FINISHED with the comparison's files as artifacts, FAILED when the command failed, or
KILLED when it was interrupted.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlflow.entities import Param, RunTag
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NOTE

from fm_optuna.tracking.observer import MlflowTracker, param_key
from fm_optuna.tracking.uris import browse_command, mask_uri

if TYPE_CHECKING:
    from fm_optuna.core._events import Observer
    from fm_optuna.tracking.store import TrackingStore


logger = logging.getLogger("fm_optuna.tracking")


class ComparisonTracking:
    """Creates the parent run of one comparison and a tracker for each compared run.

    Args:
        store: The opened store (its experiment gets the runs).
        kind: ``compare`` or ``compare-methods`` (the parent's name and role).
        study: The spec's study name.
        tag: Tag naming what a compared run varies (``strategy``, ``target``).
        higher_is_better: Direction of the target's primary metric.
        params: Logged on the parent run (the shared configuration).
    """

    def __init__(
        self,
        store: TrackingStore,
        *,
        kind: str,
        study: str,
        tag: str,
        higher_is_better: bool,
        params: Mapping[str, Any],
    ) -> None:
        self.store, self.tag, self.higher_is_better = store, tag, higher_is_better
        self.invocation = uuid.uuid4().hex[:12]
        run = store.client.create_run(
            store.experiment_id,
            run_name=f"{kind} {study} {self.invocation[:6]}",
            tags={
                "fm_optuna.role": kind,
                "fm_optuna.invocation": self.invocation,
                "optuna.study": study,
                MLFLOW_RUN_NOTE: f"`fm-optuna {kind}` of study `{study}`: one child run per "
                f"compared {tag} and seed (ForkMerge's branch runs below them). The comparison "
                "table is in this run's artifacts.",
            },
        )
        self.run_id: str = run.info.run_id
        self.status: str | None = None
        unique = {param_key(str(k)): mask_uri(str(v))[:500] for k, v in params.items()}
        self.store.client.log_batch(
            self.run_id, params=[Param(k, v) for k, v in unique.items()], synchronous=True
        )

    def observers(self, value: str, seed: int) -> Sequence[Observer]:
        tags = {
            self.tag: value,
            MLFLOW_PARENT_RUN_ID: self.run_id,
            "fm_optuna.invocation": self.invocation,
        }
        return [
            MlflowTracker(
                self.store,
                tags=tags,
                run_prefix=f"{value}-",
                higher_is_better=self.higher_is_better,
            )
        ]

    def finish(self, status: str, files: Sequence[Path] = ()) -> None:
        """End the parent run (``FINISHED``, ``FAILED`` or ``KILLED``) with ``files`` attached.
        Best effort: it runs as the command ends, where a store failure (a tracking server gone
        past its retries) would hide the comparison's outcome, or the error that ended it."""
        if self.status is not None:
            return
        self.status = status
        try:
            try:
                for path in files:
                    self.store.client.log_artifact(self.run_id, str(path))
                self.store.client.log_batch(
                    self.run_id, tags=[RunTag("fm_optuna.status", status)], synchronous=True
                )
            finally:
                self.store.client.set_terminated(self.run_id, status=status)
        except Exception as error:
            logger.warning(
                "fm-optuna: MLflow tracking to %s failed while ending the comparison's run "
                "(%s); the comparison's files are on disk",
                self.store.display_uri,
                self.store.error_line(error),
            )

    @contextlib.contextmanager
    def active(self) -> Iterator[list[Path]]:
        """Ends the parent run as the block ends: FINISHED with the files added to the yielded
        list, FAILED on an error, KILLED on Ctrl-C."""
        files: list[Path] = []
        try:
            yield files
        except KeyboardInterrupt:
            self.finish("KILLED")
            raise
        except BaseException:
            self.finish("FAILED")
            raise
        self.finish("FINISHED", files)

    def browse(self) -> list[str]:
        command = browse_command(self.store.uri, self.store.experiment_name)
        return [
            f"MLflow experiment {self.store.experiment_name!r}, parent run {self.run_id}: "
            f"{command}",
        ]
