"""``grpc://host:port`` storages: the outer study through Optuna's gRPC storage proxy.

Many workers each holding a pool of database connections and polling the database is what
Optuna's guide advises against: one proxy (``fm-optuna storage-proxy``, Optuna's
``run_grpc_proxy_server`` in front of an RDB storage) holds one cached storage and one pool, and
the workers talk to it with :class:`GrpcStorage`.

Optuna's ``GrpcStorageProxy`` is not a heartbeat storage (``BaseHeartbeat``), so through it a
killed worker's trial would stay RUNNING for ever and never be retried. :class:`GrpcStorage`
adds the heartbeat Optuna's ``optimize()`` drives, kept in a trial *system* attribute
(:data:`HEARTBEAT_ATTR`, seconds since the epoch of the worker that runs the trial): a RUNNING
trial whose heartbeat is older than the grace period is stale, and Optuna fails it and calls
the retry callback exactly as for an RDB storage. The ages are compared across hosts, so the
workers' clocks must agree to well within the grace period (NTP does that).

A proxy that stops answering (killed, restarted) is waited for, up to :data:`WAIT_SECONDS`,
with one warning line; then the worker stops with one line (:class:`StorageUnavailable`). The
trial it was running stays RUNNING, and the next worker that opens the study fails it on its
heartbeat and retries it.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import optuna
from optuna.storages import GrpcStorageProxy
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.trial import FrozenTrial, TrialState

from fm_optuna.errors import ConfigError, FmOptunaError, invalid
from fm_optuna.study._stale import HEARTBEAT_ATTR, record_stale_reasons

logger = logging.getLogger(__name__)

#: Seconds to wait for a proxy when a command opens the storage (it then says so and exits 2).
CONNECT_TIMEOUT = 5.0
#: Seconds a running worker waits for a proxy that stopped answering before it stops.
WAIT_SECONDS = 120.0


#: The client channel's options: Optuna's (no limit on a reply's size) and reconnection tries
#: at most 1 s apart (milliseconds).
_OPTIONS = [
    ("grpc.max_receive_message_length", -1),
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.min_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


class StorageUnavailable(FmOptunaError):
    """The gRPC storage proxy stopped answering for longer than the worker waits."""


def is_grpc(url: str) -> bool:
    return url.lower().startswith("grpc://")


def grpc_address(url: str) -> tuple[str, int]:
    """``(host, port)`` of ``grpc://host:port``; a one-line ConfigError otherwise.

    Example:
        >>> grpc_address("grpc://127.0.0.1:13000")
        ('127.0.0.1', 13000)
    """
    allowed = "grpc://host:port, the address of a gRPC storage proxy (`fm-optuna storage-proxy`)"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise invalid("storage", url, allowed) from None
    if not parts.hostname or port is None or parts.path not in ("", "/") or parts.query:
        raise invalid("storage", url, allowed)
    return parts.hostname, port


def _unavailable(error: Exception) -> bool:
    import grpc

    return isinstance(error, grpc.RpcError) and error.code() in (  # type: ignore[attr-defined]
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    )


class _WaitingCall:
    """One stub method that waits for a proxy that stopped answering, then gives up in a line."""

    def __init__(self, call: Callable[..., Any], owner: GrpcStorage, name: str) -> None:
        self._call, self._owner, self._name = call, owner, name

    def __call__(self, request: Any, **kwargs: Any) -> Any:
        deadline: float | None = None
        while True:
            try:
                result = self._call(request, **kwargs)
            except Exception as error:
                if not _unavailable(error):
                    raise
                now = time.monotonic()
                if deadline is None:
                    deadline = now + self._owner.wait_seconds
                    if not self._owner.waiting:  # one line per outage, whatever thread meets it
                        self._owner.waiting = True
                        logger.warning(
                            "fm-optuna: the storage %s does not answer (%s): waiting up to "
                            "%.0f s for it",
                            self._owner.url,
                            error.code().name,  # type: ignore[attr-defined]
                            self._owner.wait_seconds,
                        )
                if now >= deadline:
                    raise StorageUnavailable(
                        f"the storage {self._owner.url} did not answer for "
                        f"{self._owner.wait_seconds:.0f} s; what it recorded is kept, and a "
                        "trial left RUNNING is retried by the next `fm-optuna tune` once it "
                        "answers again"
                    ) from None
                time.sleep(min(1.0, max(deadline - now, 0.0)))
                continue
            self._owner.answered()
            if self._owner.waiting:
                self._owner.waiting = False
                logger.warning("fm-optuna: the storage %s answers again", self._owner.url)
            return result


class _WaitingStub:
    def __init__(self, stub: Any, owner: GrpcStorage) -> None:
        self._stub, self._owner = stub, owner

    def __getattr__(self, name: str) -> Any:
        return _WaitingCall(getattr(self._stub, name), self._owner, name)


class GrpcStorage(GrpcStorageProxy, BaseHeartbeat):
    """Optuna's gRPC client with heartbeats and a bounded wait for a restarted proxy.

    Args:
        url: ``grpc://host:port``.
        heartbeat_interval: Seconds between a running trial's heartbeats (``None``: none).
        grace_period: A RUNNING trial silent for longer is stale (default: twice the interval).
        failed_trial_callback: Called with each stale trial Optuna fails (the retry).
        wait_seconds: How long a call waits for a proxy that stopped answering.
    """

    def __init__(
        self,
        url: str,
        *,
        heartbeat_interval: int | None = None,
        grace_period: int | None = None,
        failed_trial_callback: Callable[[optuna.Study, FrozenTrial], None] | None = None,
        wait_seconds: float = WAIT_SECONDS,
    ) -> None:
        self.url = url
        self.wait_seconds = wait_seconds
        self.waiting = False  # in an outage (said once)
        # When this client last started hearing from the proxy again (monotonic): its first
        # answer, or one after a silence longer than the grace period (an outage it may not
        # have seen); and when it last heard from it.
        self.recovered_at: float | None = None
        self.last_answer: float | None = None
        self.heartbeat_interval = heartbeat_interval
        self.grace_period = grace_period
        self.failed_trial_callback = failed_trial_callback
        host, port = grpc_address(url)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            super().__init__(host=host, port=port)

    def _setup(self) -> None:
        import grpc
        from optuna.storages._grpc.auto_generated import api_pb2_grpc

        super()._setup()
        # Optuna's channel reconnects to a proxy that went away with gRPC's default back-off
        # (1 s growing 1.6 times per failed try, up to 2 min): after a restart one worker could
        # hear from the proxy 10 s after the others, which meanwhile judged its live trial stale
        # and failed it. Tries at most 1 s apart keep every worker within about a second.
        self._channel.close()
        self._channel = grpc.insecure_channel(f"{self._host}:{self._port}", options=_OPTIONS)
        self._stub = _WaitingStub(api_pb2_grpc.StorageServiceStub(self._channel), self)
        self._cache.grpc_client = self._stub

    def answered(self) -> None:
        now = time.monotonic()
        quiet = self.grace_period or 2 * (self.heartbeat_interval or 0)
        if self.last_answer is None or now - self.last_answer > quiet:
            self.recovered_at = now
        self.last_answer = now

    # --- BaseHeartbeat -------------------------------------------------------------------

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            self.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())
        except (StorageUnavailable, optuna.exceptions.UpdateFinishedTrialError):
            # The heartbeat's thread: the trial's own calls say it (the proxy is gone, or
            # another worker failed the trial meanwhile).
            logger.debug("heartbeat of trial %d not recorded", trial_id)

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        assert self.heartbeat_interval is not None
        grace = self.grace_period or 2 * self.heartbeat_interval
        # Right after an outage every live trial's heartbeat is old: they had no proxy to beat
        # through. A client judges only once it has heard from the proxy for a grace period and
        # an interval (its live trials have beaten again by then), be it a worker that waited
        # through the outage, one that slept through it, or one started after it.
        if (
            self.recovered_at is None
            or time.monotonic() - self.recovered_at < grace + self.heartbeat_interval
        ):
            return []
        now = time.time()
        stale = []
        for trial in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            beat = trial.system_attrs.get(HEARTBEAT_ATTR)
            if isinstance(beat, int | float) and now - beat > grace:
                stale.append(trial._trial_id)
        return record_stale_reasons(self, stale, grace)

    def get_heartbeat_interval(self) -> int | None:
        return self.heartbeat_interval

    def get_heartbeat_stale_trial_callback(
        self,
    ) -> Callable[[optuna.Study, FrozenTrial], None] | None:
        return self.failed_trial_callback


def check_grpc(url: str, *, timeout: float = CONNECT_TIMEOUT) -> None:
    """Raise a one-line ConfigError unless a gRPC storage proxy answers at ``url`` within
    ``timeout`` seconds."""
    host, port = grpc_address(url)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        client = GrpcStorageProxy(host=host, port=port)
    try:
        client.wait_server_ready(timeout=timeout)
    except ConnectionError:
        raise ConfigError(
            f"Parameter `storage` should be a reachable Optuna storage URL. Found "
            f"`storage = {url}` (no gRPC storage proxy answered within {timeout:.0f} s; start "
            "one with `fm-optuna storage-proxy --storage postgresql://...`)."
        ) from None
    finally:
        client.close()
