"""One background thread that runs the tracker's slow work in order, off the training thread.

The training thread only *submits* jobs: closures over data it has already copied (see
:func:`fm_optuna.tracking.observer.captured`), so nothing a job reads changes under it. One worker
thread runs them strictly in submission order, so a run is created before its metrics are logged
and ended after them, exactly as when the calls were made inline.

An error a job raises is kept, the jobs after it are skipped (they would log into a state the
failed one left half-done) and the error is raised once in the submitting thread, at its next
:meth:`~BackgroundWriter.submit`, :meth:`~BackgroundWriter.wait` or
:meth:`~BackgroundWriter.close`: never swallowed. (The MLflow tracker's own jobs catch store
failures themselves and report them as before: one warning, then what was not logged.)

Example:
    >>> writer = BackgroundWriter()
    >>> done = []
    >>> for item in range(3):
    ...     _ = writer.submit(lambda item=item: done.append(item))
    >>> writer.close()
    >>> done
    [0, 1, 2]
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable

__all__ = ["BackgroundWriter"]

_STOP = None  # the queue item that ends the worker


class BackgroundWriter:
    """A queue of jobs and the one daemon thread that runs them in order.

    Args:
        name: The thread's name (it shows in a stack dump).
    """

    def __init__(self, name: str = "fm-optuna-tracking") -> None:
        self._queue: queue.SimpleQueue[tuple[int, Callable[[], None]] | None] = queue.SimpleQueue()
        self._changed = threading.Condition()
        self._submitted = 0  # sequence number of the latest job submitted
        self._done = 0  # ... and of the latest job finished (run, skipped or failed)
        self._running = 0
        self._latest: dict[str, int] = {}  # key -> sequence number of its latest job
        self._error: BaseException | None = None
        self._error_raised = False
        self._closing = False
        #: Seconds the worker spent running jobs (its own time, off the training thread).
        self.busy_seconds = 0.0
        #: Jobs skipped because an earlier one raised.
        self.skipped = 0
        # A daemon: a process whose caller forgot close() still exits (losing the queue).
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def submit(self, job: Callable[[], None], *, key: str | None = None) -> int:
        """Queue ``job``; returns its sequence number (for :meth:`wait`). ``key`` names a kind of
        job that a later one of the same kind makes redundant (see :meth:`superseded`)."""
        self._raise_error()
        if self._closing:
            raise RuntimeError("the background writer is closed")
        with self._changed:
            # Counted only once queued: a signal raised between two of these lines (Ctrl-C
            # arrives between any two bytecodes) never leaves wait() waiting for a lost job.
            number = self._submitted + 1
            self._queue.put((number, job))
            self._submitted = number
            if key is not None:
                self._latest[key] = number
        return number

    def superseded(self, key: str) -> bool:
        """Inside a running job: whether a later job of the same ``key`` is already queued (so
        this one may skip work the later one redoes, e.g. redrawing a figure)."""
        with self._changed:
            return self._latest.get(key, 0) > self._running

    def wait(self, number: int | None = None) -> None:
        """Block until job ``number`` (default: every job submitted so far) has finished; raise
        the error of a failed job."""
        with self._changed:
            target = self._submitted if number is None else number
            while self._done < target and self._thread.is_alive():
                self._changed.wait()
        self._raise_error()

    def close(self) -> None:
        """Run what is queued, stop the thread, and raise a failed job's error (once)."""
        if not self._closing:
            self._closing = True
            self._queue.put(_STOP)
        self._thread.join()
        self._raise_error()

    @property
    def pending(self) -> int:
        """Jobs submitted and not finished yet."""
        with self._changed:
            return self._submitted - self._done

    def _raise_error(self) -> None:
        with self._changed:
            error = None if self._error_raised else self._error
            self._error_raised = self._error is not None
        if error is not None:
            raise error

    def _work(self) -> None:
        while (item := self._queue.get()) is not _STOP:
            number, job = item
            with self._changed:
                self._running = number
            self._run(job)
            with self._changed:
                self._done = number
                self._changed.notify_all()

    def _run(self, job: Callable[[], None]) -> None:
        if self._error is not None:
            self.skipped += 1
            return
        tic = time.perf_counter()
        try:
            job()
        except BaseException as error:  # kept for the submitting thread, which raises it
            with self._changed:
                self._error = error
        finally:
            self.busy_seconds += time.perf_counter() - tic
