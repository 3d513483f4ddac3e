"""Why a trial failed on its heartbeat, kept on the trial.

Optuna fails a RUNNING trial whose worker stopped beating (killed, or cut off from the storage)
and hands it to the retry callback, but records no reason: the trial is a bare FAIL in the
dashboard, the study's MLflow page and ``fm-optuna tune``'s table. Before Optuna fails them, the
storages of :func:`fm_optuna.study._tuner.open_storage` write each stale trial's ``fail_reason``
(which worker went silent, for how long at least, and which worker noticed). It has to be
written while the trial still RUNS: a finished trial takes no attributes. Two workers judging
the same trial at once both write a reason; only one of them fails it.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from typing import Any

import optuna
from optuna.trial import FrozenTrial

from fm_optuna.study._processes import this_worker

logger = logging.getLogger(__name__)

#: The trial user attribute holding why it failed (also for failures other than heartbeats).
FAIL_REASON = "fail_reason"
#: The trial system attribute a ``grpc://`` worker's heartbeat writes (its ``time.time()``).
HEARTBEAT_ATTR = "fm_optuna:heartbeat"
#: Set on a trial failed on its heartbeat: it does not count towards the study's total (it is
#: retried), unlike a FAIL with a reason of its own (training went non-finite).
STALE = "failed_on_heartbeat"


def stale_reason(worker: str | None, grace: float) -> str:
    """The ``fail_reason`` of a trial whose worker stopped beating.

    Example:
        >>> stale_reason("node7:4242", 4)[:62]
        'its worker node7:4242 sent no heartbeat for more than 4 s (kil'
    """
    who = f"its worker {worker}" if worker else "its worker"
    return (
        f"{who} sent no heartbeat for more than {grace:g} s (killed, or cut off from the "
        f"storage); failed on its heartbeat by {this_worker()}"
    )


def without_reason(trial: FrozenTrial) -> FrozenTrial:
    """``trial`` as the template of its retry: why it failed stays with it, not the retry, and
    so does its last heartbeat (an old one would make the retry look stale from the moment a
    worker takes it until its own first heartbeat lands)."""
    template = copy.deepcopy(trial)
    template.user_attrs = {
        k: v for k, v in trial.user_attrs.items() if k not in (FAIL_REASON, STALE)
    }
    template.system_attrs = {k: v for k, v in trial.system_attrs.items() if k != HEARTBEAT_ATTR}
    return template


def record_stale_reasons(
    storage: optuna.storages.BaseStorage, trial_ids: Sequence[int], grace: float
) -> list[int]:
    """Write the ``fail_reason`` of each stale trial about to be failed; returns the ids.

    Best effort: a trial another worker failed meanwhile (or a storage that refuses the write)
    keeps what it has, and the trial is failed all the same.
    """
    for trial_id in trial_ids:
        try:
            worker = storage.get_trial(trial_id).user_attrs.get("worker")
            # The mark first: a reason without it would count the trial as finished.
            storage.set_trial_user_attr(trial_id, STALE, True)
            storage.set_trial_user_attr(trial_id, FAIL_REASON, stale_reason(worker, grace))
        except Exception as error:  # finished meanwhile, or the storage is failing: Optuna says
            logger.debug("no fail_reason for stale trial %d: %s", trial_id, error)
    return list(trial_ids)


class ReasonedRDBStorage(optuna.storages.RDBStorage):
    """Optuna's RDBStorage whose heartbeat-failed trials carry a ``fail_reason``."""

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        stale = super()._get_stale_trial_ids(study_id)
        grace: Any = self.grace_period or 2 * (self.heartbeat_interval or 0)
        return record_stale_reasons(self, stale, float(grace))
