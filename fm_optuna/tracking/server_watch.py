"""One line when the MLflow tracking server stops answering, one when it is back.

MLflow's client retries a request to a server that refuses connections, with back-off, for
minutes (:func:`retry_seconds`), and says nothing meanwhile: a worker whose tracking server was
killed looked hung. Every call through a server store's client is therefore watched
(:class:`WatchedClient`): a watchdog thread notices a call that has been running for more than
:data:`PATIENCE` seconds and asks the server's ``/health`` with a short timeout. If the server
does not answer, the process prints one line (the server's URI, password masked; that it waits;
for how long at most), probes until the server answers again and then prints one line more.

Should MLflow's retries run out first, the call's error becomes one line
(:class:`TrackingUnavailable`) and later calls fail at once, instead of each waiting the
retries' minutes again, until the server answers again. The callers already treat a failed call
as lost tracking, never as lost training (:mod:`fm_optuna.tracking.observer`).

There is one watch per server and process (:func:`watch_for`), whatever the number of stores,
trackers and threads calling it: one line per process and outage.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from fm_optuna.errors import FmOptunaError
from fm_optuna.tracking.uris import mask_uri

__all__ = [
    "ServerWatch",
    "TrackingUnavailable",
    "WatchedClient",
    "health",
    "retry_seconds",
    "watch_for",
]

logger = logging.getLogger("fm_optuna.tracking")

#: Seconds a call may run before the server is asked whether it is there. A loaded server
#: answers a log call in well under a second; an artifact upload may take longer, which costs
#: one ``/health`` request, not a line.
PATIENCE = 3.0
#: Seconds a ``/health`` probe waits for an answer.
PROBE_TIMEOUT = 5.0
#: Seconds between probes while the server does not answer.
PROBE_EVERY = 1.0


class TrackingUnavailable(FmOptunaError):
    """The MLflow tracking server did not answer within MLflow's retries.

    Attributes:
        already_said: Another call of this process met the same outage's end first (a caller
            need not repeat its line).
    """

    def __init__(self, message: str, *, already_said: bool = False) -> None:
        super().__init__(message)
        self.already_said = already_said


#: How urllib3 words retries that ran out (inside MLflow's ``MlflowException``); a request cut
#: mid-answer, which MLflow does not retry, fails at once without it.
_RETRIES_RAN_OUT = "Max retries exceeded"


def health(uri: str, *, timeout: float = PROBE_TIMEOUT) -> str | None:
    """``None`` when the server at ``uri`` answers 200 on ``/health`` within ``timeout``
    seconds; otherwise why not, in a few words (``Connection refused``, ``no answer within 5
    s``, ``the server answered 503 ...``). The probe carries no credentials: ``/health`` needs
    none."""
    parts = urllib.parse.urlsplit(uri)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    url = urllib.parse.urlunsplit(parts._replace(netloc=netloc, query="", fragment=""))
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=timeout) as response:
            response.read(64)
    except urllib.error.HTTPError as error:
        return f"the server answered {error.code} {error.reason} on /health"
    except TimeoutError:
        return f"no answer within {timeout:g} s"
    except (OSError, ValueError) as error:
        reason = getattr(error, "reason", error)
        if isinstance(reason, TimeoutError):
            return f"no answer within {timeout:g} s"
        return str(getattr(reason, "strerror", None) or reason)
    return None


def retry_seconds(*, with_timeouts: bool = False) -> float:
    """How long, at most, MLflow's client retries one call before it raises.

    MLflow (3.17) hands its HTTP requests to urllib3's ``Retry`` with
    ``total = MLFLOW_HTTP_REQUEST_MAX_RETRIES`` (default 7), ``backoff_factor =
    MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR`` (2) and ``backoff_jitter =
    MLFLOW_HTTP_REQUEST_BACKOFF_JITTER`` (1.0): after the n-th failure (n ≥ 2) it sleeps
    ``factor × 2^(n-1)`` plus at most the jitter, capped at ``Retry.DEFAULT_BACKOFF_MAX`` (120 s),
    and it gives up at failure ``retries + 1``. With the defaults: 4 + 8 + 16 + 32 + 64 + 120 s
    plus 5 s of jitter, 249 s. A refused connection fails at once; ``with_timeouts`` adds, for
    a server that accepts nothing and refuses nothing, ``MLFLOW_HTTP_REQUEST_TIMEOUT`` (120 s)
    per attempt.

    Example:
        >>> retry_seconds()  # doctest: +SKIP
        249.0
    """
    from mlflow.environment_variables import (
        MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR,
        MLFLOW_HTTP_REQUEST_BACKOFF_JITTER,
        MLFLOW_HTTP_REQUEST_MAX_RETRIES,
        MLFLOW_HTTP_REQUEST_TIMEOUT,
    )
    from urllib3.util import Retry

    retries = max(int(MLFLOW_HTTP_REQUEST_MAX_RETRIES.get()), 0)
    factor = float(MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR.get())
    jitter = float(MLFLOW_HTTP_REQUEST_BACKOFF_JITTER.get())
    cap = float(Retry.DEFAULT_BACKOFF_MAX)
    sleeps = sum(min(cap, factor * 2 ** (n - 1) + jitter) for n in range(2, retries + 1))
    if with_timeouts:
        sleeps += (retries + 1) * float(MLFLOW_HTTP_REQUEST_TIMEOUT.get())
    return float(sleeps)


def _retry_settings() -> str:
    from mlflow.environment_variables import (
        MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR,
        MLFLOW_HTTP_REQUEST_MAX_RETRIES,
    )

    return (
        f"MLFLOW_HTTP_REQUEST_MAX_RETRIES={MLFLOW_HTTP_REQUEST_MAX_RETRIES.get()}, "
        f"MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR={MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR.get()}"
    )


class ServerWatch:
    """Watches the calls to one tracking server and says when it stops and starts answering.

    Args:
        uri: The server's tracking URI (shown with its password masked).
        patience: Seconds a call may run before the server is probed.
        every: Seconds between probes while it does not answer.
        probe: Returns ``None`` when the server answers, else why not (default: :func:`health`).
        say: Where the lines go (default: the ``fm_optuna.tracking`` logger's warnings).
    """

    def __init__(
        self,
        uri: str,
        *,
        patience: float = PATIENCE,
        every: float = PROBE_EVERY,
        probe: Callable[[str], str | None] = health,
        say: Callable[[str], None] | None = None,
    ) -> None:
        self.uri, self.patience, self.every = uri, patience, every
        self._probe = probe
        self._say = say or logger.warning
        self._changed = threading.Condition()
        self._calls: dict[int, float] = {}  # call number -> when it started (monotonic)
        self._counter = 0
        self._next_probe = 0.0  # a slow call answered by a healthy probe waits until then
        self._thread: threading.Thread | None = None
        #: The server did not answer the latest probe (said once per outage).
        self.waiting = False
        #: A call ran out of MLflow's retries in this outage: later ones fail at once.
        self.gave_up = False

    @property
    def display_uri(self) -> str:
        return mask_uri(self.uri)

    @contextmanager
    def calling(self) -> Iterator[None]:
        """Around one call to the server: watched while it runs; its error, should it end an
        outage's retries, is one line."""
        with self._changed:
            if self.gave_up:
                raise self._unavailable(said=True)
            self._counter += 1
            number = self._counter
            self._calls[number] = time.monotonic()
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._watch, name="fm-optuna-server-watch", daemon=True
                )
                self._thread.start()
            self._changed.notify_all()
        try:
            yield
        except TrackingUnavailable:
            raise
        except Exception as error:
            with self._changed:
                if not self.waiting or _RETRIES_RAN_OUT not in str(error):
                    raise  # the server's own answer, or a failure MLflow does not retry
                said, self.gave_up = self.gave_up, True
            raise self._unavailable(said=said) from None
        finally:
            with self._changed:
                self._calls.pop(number, None)

    def _unavailable(self, *, said: bool) -> TrackingUnavailable:
        return TrackingUnavailable(
            f"the MLflow tracking server {self.display_uri} did not answer within MLflow's "
            f"retries (up to {retry_seconds():.0f} s); this process logs to it again once it "
            "answers",
            already_said=said,
        )

    def _watch(self) -> None:
        while True:
            with self._changed:
                while not self.waiting and not self._calls:
                    self._changed.wait()
                now = time.monotonic()
                if self.waiting:
                    due = self._next_probe
                else:
                    due = max(min(self._calls.values()) + self.patience, self._next_probe)
                if now < due:
                    self._changed.wait(due - now)
                    continue
            reason = self._probe(self.uri)  # outside the lock: it may take its timeout
            with self._changed:
                self._next_probe = time.monotonic() + (self.every if reason else self.patience)
                if reason is not None and not self.waiting:
                    self.waiting = True
                    line = self._waiting_line(reason)
                elif reason is None and self.waiting:
                    self.waiting = self.gave_up = False
                    line = f"fm-optuna: the MLflow tracking server {self.display_uri} answers again"
                else:
                    line = None
            if line is not None:
                self._say(line)

    def _waiting_line(self, reason: str) -> str:
        timed_out = reason.startswith("no answer within")
        seconds = retry_seconds(with_timeouts=timed_out)
        return (
            f"fm-optuna: the MLflow tracking server {self.display_uri} does not answer "
            f"({reason}): waiting up to {seconds:.0f} s for it (MLflow's retries: "
            f"{_retry_settings()}), then tracking stops and training goes on"
        )


class WatchedClient:
    """An ``MlflowClient`` whose every method call runs inside :meth:`ServerWatch.calling`.

    Args:
        client: The client of a server store.
        watch: The server's watch (:func:`watch_for`).
    """

    def __init__(self, client: Any, watch: ServerWatch) -> None:
        self.wrapped, self.watch = client, watch

    def __getattr__(self, name: str) -> Any:
        value = getattr(self.wrapped, name)
        if not callable(value):
            return value

        @functools.wraps(value)
        def call(*args: Any, **kwargs: Any) -> Any:
            with self.watch.calling():
                return value(*args, **kwargs)

        return call


_WATCHES: dict[tuple[int, str], ServerWatch] = {}
_WATCHES_LOCK = threading.Lock()


def watch_for(uri: str) -> ServerWatch:
    """This process's watch of the server ``uri`` (keyed by process: a forked child gets its
    own, its parent's watchdog thread does not exist there)."""
    key = (os.getpid(), uri.rstrip("/"))
    with _WATCHES_LOCK:
        if key not in _WATCHES:
            _WATCHES[key] = ServerWatch(uri)
        return _WATCHES[key]
