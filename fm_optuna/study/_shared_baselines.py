"""The study's baselines, trained once however many workers finish a shared study.

Every worker of a study ends by comparing the best trial with the spec's baselines (STL, EW, …)
trained at the best trial's budget. Workers of one study tend to finish together, and without
coordination each would train every baseline again. Here each result is kept in its own study
user attribute (``baseline:<method> <budget>``; the budget names the steps, learning rate, seed
and the study's configuration fingerprint, so a baseline trained under another configuration is
never reused: see :mod:`fm_optuna.study._fingerprint`), and a missing one is claimed first
(``baseline_claim:<method> <budget>``, a study *system* attribute: an internal record that
optuna-dashboard does not list among the study's attributes; claims written as user attributes
by older versions are still read): a worker writes its claim, waits a moment and reads the
claim back. Storages keep the last write, so of workers claiming together exactly one reads back
its own name and trains; the others train the baselines nobody has claimed (two workers split
STL and EW) and then wait for the rest. A claim whose worker is gone (its process ended on this
host, or the claim is older than ``stale_after`` seconds, for a worker on another host) is taken
over, so a killed worker never leaves a baseline untrained.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import optuna

from fm_optuna.study._processes import this_worker, worker_is_gone

logger = logging.getLogger(__name__)

RESULT, CLAIM = "baseline:", "baseline_claim:"
#: The user attribute where results were kept before claims (one dict for all baselines).
LEGACY_RESULTS = "baselines"


@dataclass
class SharedBaselines:
    """Each baseline of ``methods`` trained by exactly one live worker of ``study``."""

    study: optuna.Study
    train: Callable[[str], dict[str, float]]  # method → {"val", "test", "seconds"}
    stale_after: float
    settle_seconds: float = 0.5  # longer than a storage round trip: claims written together settle
    poll_seconds: float = 2.0

    def scores(self, methods: Sequence[str], budget: str) -> dict[str, dict[str, float]]:
        found: dict[str, dict[str, float]] = {}
        for method in methods:  # first what nobody trains yet, …
            result = self._result(method, budget)
            if result is None and self._claim(method, budget):
                result = self._train(method, budget)
            if result is not None:
                found[method] = result
        for method in methods:  # … then wait for what other workers train
            if method not in found:
                found[method] = self._wait(method, budget)
        return {method: found[method] for method in methods}

    def _key(self, method: str, budget: str) -> str:
        return f"{method} {budget}"

    def _result(self, method: str, budget: str) -> dict[str, float] | None:
        attrs = self.study.user_attrs
        key = self._key(method, budget)
        return attrs.get(RESULT + key) or attrs.get(LEGACY_RESULTS, {}).get(key)

    def _read_claim(self, method: str, budget: str) -> dict[str, Any] | None:
        key = CLAIM + self._key(method, budget)
        claims = self.study._storage.get_study_system_attrs(self.study._study_id)
        return claims.get(key) or self.study.user_attrs.get(key)  # user: written before

    def _live_claim(self, method: str, budget: str) -> dict[str, Any] | None:
        claim = self._read_claim(method, budget)
        if claim is None or claim["worker"] == this_worker():
            return None  # never claimed, or by this worker before (whose training then failed)
        if worker_is_gone(claim["worker"]) or time.time() - claim["time"] > self.stale_after:
            return None
        return claim

    def _claim(self, method: str, budget: str) -> bool:
        if self._live_claim(method, budget) is not None:
            return False
        me = this_worker()
        self.study._storage.set_study_system_attr(
            self.study._study_id,
            CLAIM + self._key(method, budget),
            {"worker": me, "time": time.time()},
        )
        time.sleep(self.settle_seconds)
        claim = self._read_claim(method, budget)
        return claim is not None and claim["worker"] == me

    def _train(self, method: str, budget: str) -> dict[str, float]:
        result = self.train(method)
        self.study.set_user_attr(RESULT + self._key(method, budget), result)
        return result

    def _wait(self, method: str, budget: str) -> dict[str, float]:
        claim = self._live_claim(method, budget)
        if claim is not None:
            logger.warning(
                "%s is being trained by worker %s: waiting for it", method.upper(), claim["worker"]
            )
        while True:
            result = self._result(method, budget)
            if result is not None:
                return result
            if self._live_claim(method, budget) is None and self._claim(method, budget):
                return self._train(method, budget)  # its worker is gone: train it here
            time.sleep(self.poll_seconds)
