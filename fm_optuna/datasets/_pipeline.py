"""Decoding off the training thread: batches drawn where they always were, decoded ahead.

A folder data set spends most of a step decoding files (PIL for DomainNet's JPEGs, ``np.load``
for NYUv2's arrays). :class:`Prefetcher` moves that work to a pool of background threads while
keeping every random draw where the :class:`~fm_optuna.problem.Problem` contract puts it: on the
branch's ``torch.Generator``, in the training thread. The pattern, for the shipped folder
benchmarks and for your own problem:

1. **draw** — a function of the generator only, ``draw(generator) -> plan``: the batch's indices
   and its augmentation draws (flips, crops), in the same order as the inline code draws them;
2. **decode** — ``decode(key) -> batch``, deterministic in ``key`` (e.g. the tuple of file paths)
   and safe to call from several threads (PIL and ``np.load`` release the GIL while they work);
3. in ``task_losses``: ``plan = draw(generator)`` on the real generator, then
   ``prefetcher.ahead(generator, this step's keys, the next steps' keys)`` (the next ones from
   :func:`lookahead`: the same ``draw`` on a copy of the generator), then
   ``prefetcher.get(generator, key)`` for each of this step's keys.

Why the result is bit for bit the inline one: the generator is advanced only by the real draw,
exactly as before, and a decoded batch is looked up by the key that defines its content, so a
prefetched batch is the very batch inline decoding would have produced. A guess that turns out
wrong (another task list next step, a branch that stops at a merge) is a miss: the batch is
decoded in the calling thread and the stale guesses are dropped.

Why resuming needs nothing more: what a stream will read next is its generator's state, which
the ForkMerge checkpoint already holds for every branch. The prefetched batches are a cache of
pure functions of that state; a resumed process starts with an empty cache, misses once per
stream and refills it, and trains on the same batches.

Why threads rather than worker processes: measured by ``fm-optuna bench --measure-input``
(studies/RESULTS.md). Decoding releases the GIL, so threads overlap it with the training step as
processes would, without pickling every batch across a pipe, without a process start per
worker (importing torch) and without a copy of the problem in each process; and they share the
problem's cache.

On CUDA the decoded batches are pinned in the worker, and moved with ``non_blocking=True``.

Example:
    >>> import torch
    >>> squares = Prefetcher(lambda key: torch.tensor(key) ** 2, workers=2, prefetch=2)
    >>> g = torch.Generator().manual_seed(0)
    >>> def draw(gen: torch.Generator) -> tuple[int, ...]:
    ...     return tuple(torch.randint(10, (3,), generator=gen).tolist())
    >>> key = draw(g)
    >>> squares.ahead(g, [key], lookahead(g, draw, 2))
    >>> squares.get(g, key).tolist() == [k * k for k in key]
    True
    >>> squares.close()
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Generic, TypeVar

import torch

__all__ = ["DEFAULT_PREFETCH", "DEFAULT_WORKERS", "Prefetcher", "lookahead", "to_device"]

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")
P = TypeVar("P")

#: Background decoding threads of the folder benchmarks (0 decodes inline, as before).
DEFAULT_WORKERS = 2
#: Steps decoded ahead of the one being trained, per stream.
DEFAULT_PREFETCH = 2
#: Streams (generators) whose guesses are kept: a round's branches, plus slack.
MAX_STREAMS = 8


def _map_tensors(value: Any, function: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``function`` applied to every tensor in nested tuples, lists and dicts."""
    if isinstance(value, torch.Tensor):
        return function(value)
    if isinstance(value, dict):
        return {key: _map_tensors(item, function) for key, item in value.items()}
    if isinstance(value, tuple | list):
        return type(value)(_map_tensors(item, function) for item in value)
    return value


def to_device(batch: T, device: torch.device) -> T:
    """Every tensor of ``batch`` on ``device``; a copy from pinned memory does not block."""

    def move(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(device, non_blocking=tensor.is_pinned())

    return _map_tensors(batch, move)  # type: ignore[no-any-return]


def lookahead(
    generator: torch.Generator, draw: Callable[[torch.Generator], P], steps: int
) -> list[P]:
    """What ``draw`` will return on ``generator``'s next ``steps`` calls; ``generator`` itself is
    left where it is (the draws are made on a copy of its state)."""
    if steps <= 0:
        return []
    copy = torch.Generator(device=generator.device)
    copy.set_state(generator.get_state())
    return [draw(copy) for _ in range(steps)]


class Prefetcher(Generic[K, T]):
    """Batches decoded by ``workers`` background threads ahead of the training thread.

    Args:
        decode: ``key -> batch`` (tensors in nested tuples and dicts, on the CPU),
            deterministic in ``key`` and thread-safe.
        workers: Decoding threads; 0 decodes every batch in the calling thread (no guesses).
        prefetch: How many steps a stream guesses ahead (read by the caller for
            :func:`lookahead`), and the number of evaluation chunks in flight.
        pin: Pin decoded batches (for a CUDA device; :func:`to_device` then does not block).

    Thread-safe: several training threads (parallel branches) may share one prefetcher, each
    with its own stream.
    """

    def __init__(
        self,
        decode: Callable[[K], T],
        *,
        workers: int = DEFAULT_WORKERS,
        prefetch: int = DEFAULT_PREFETCH,
        pin: bool = False,
    ) -> None:
        self.decode = decode
        self.workers = workers
        self.prefetch = prefetch
        self.pin = pin
        #: Keys a step asked for that had been guessed (decoded ahead), and those that had not.
        self.hits = 0
        self.misses = 0
        self._lock = threading.Lock()
        self._streams: OrderedDict[int, OrderedDict[K, Future[T]]] = OrderedDict()
        self._pool: ThreadPoolExecutor | None = None
        self._pid = 0

    @property
    def enabled(self) -> bool:
        return self.workers > 0 and self.prefetch > 0

    def _decoded(self, key: K) -> T:
        batch = self.decode(key)
        return _map_tensors(batch, torch.Tensor.pin_memory) if self.pin else batch  # type: ignore[no-any-return]

    def _executor(self) -> ThreadPoolExecutor:
        # A forked child (a tune worker) inherits the object but not its threads: start anew.
        if self._pool is None or self._pid != os.getpid():
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="fm-optuna-decode")
            self._pid = os.getpid()
            self._streams.clear()
        return self._pool

    def ahead(self, stream: object, now: Sequence[K], later: Iterable[K] = ()) -> None:
        """Make sure ``stream``'s keys are decoding: ``now``, the ones this step is about to
        :meth:`get` (decoded by several workers at once when they were not guessed), then
        ``later``, its guesses of the next steps. This stream's earlier guesses that are among
        neither are dropped: they were wrong."""
        if not self.enabled:
            return
        wanted = list(dict.fromkeys([*now, *later]))
        with self._lock:
            pool = self._executor()
            pending = self._streams.pop(id(stream), OrderedDict())
            guessed = sum(key in pending for key in set(now))
            self.hits += guessed
            self.misses += len(set(now)) - guessed
            for key in [key for key in pending if key not in wanted]:
                pending.pop(key).cancel()
            for key in wanted:
                if key not in pending:
                    pending[key] = pool.submit(self._decoded, key)
            self._streams[id(stream)] = pending
            while len(self._streams) > MAX_STREAMS:
                _, dropped = self._streams.popitem(last=False)
                for future in dropped.values():
                    future.cancel()

    def get(self, stream: object, key: K) -> T:
        """The batch ``key``: the one decoding for ``stream`` (see :meth:`ahead`) if there is
        one, else decoded now in the calling thread (the same batch either way)."""
        future = None
        if self.enabled:
            with self._lock:
                pending = self._streams.get(id(stream))
                future = None if pending is None else pending.pop(key, None)
        if future is None or future.cancelled():
            return self._decoded(key)
        return future.result()

    def ordered(self, keys: Sequence[K]) -> Iterator[T]:
        """Every batch of ``keys`` in order, the next ``prefetch`` decoding while one is used (an
        evaluation pass over a split)."""
        if not self.enabled:
            for key in keys:
                yield self._decoded(key)
            return
        with self._lock:
            pool = self._executor()
        queue: list[Future[T]] = []
        position = 0
        try:
            for _ in keys:
                while position < len(keys) and len(queue) <= self.prefetch:
                    queue.append(pool.submit(self._decoded, keys[position]))
                    position += 1
                yield queue.pop(0).result()
        finally:
            for future in queue:  # a pass stopped early (a pruned candidate)
                future.cancel()

    def close(self) -> None:
        """Stop the threads (pending guesses are dropped); the prefetcher starts them again if
        used afterwards."""
        with self._lock:
            pool, self._pool = self._pool, None
            self._streams.clear()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    def __getstate__(self) -> dict[str, Any]:
        # A deep copy or a pickled problem gets no threads and no guesses of its own.
        state = self.__dict__.copy()
        state.update(_lock=None, _streams=OrderedDict(), _pool=None, _pid=0)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
