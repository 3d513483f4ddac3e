"""The prefetching decode pipeline: a cache of pure decodes that can only ever miss.

The folder benchmarks' own tests check that their batches are bit for bit the inline ones; here
the mechanism: guesses decoded ahead are used when right, dropped when wrong, a batch comes out
the same whether it was guessed or not, and the generator is never moved by a guess.
"""

from __future__ import annotations

import copy
import pickle
import threading

import pytest
import torch

from fm_optuna.datasets._pipeline import Prefetcher, lookahead, to_device


class Decoder:
    """``key -> tensor(key)``, counting calls and the threads that made them."""

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.threads: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, key: int) -> torch.Tensor:
        with self._lock:
            self.calls.append(key)
            self.threads.add(threading.current_thread().name)
        return torch.full((2,), float(key))


def draw(generator: torch.Generator) -> int:
    return int(torch.randint(1000, (1,), generator=generator))


def test_lookahead_predicts_the_next_draws_and_leaves_the_generator_alone() -> None:
    generator = torch.Generator().manual_seed(3)
    state = generator.get_state()
    guessed = lookahead(generator, draw, 4)
    assert torch.equal(generator.get_state(), state)
    assert [draw(generator) for _ in range(4)] == guessed
    assert lookahead(generator, draw, 0) == []


def test_right_guesses_are_hits_wrong_ones_are_dropped() -> None:
    decoder = Decoder()
    pipeline = Prefetcher(decoder, workers=2, prefetch=2)
    stream = torch.Generator()
    pipeline.ahead(stream, [1], [2, 3])  # the first step: nothing was guessed yet
    assert (pipeline.hits, pipeline.misses) == (0, 1)
    assert torch.equal(pipeline.get(stream, 1), torch.full((2,), 1.0))
    pipeline.ahead(stream, [2], [3, 4])
    assert (pipeline.hits, pipeline.misses) == (1, 1)
    assert torch.equal(pipeline.get(stream, 2), torch.full((2,), 2.0))
    # The next step asks for 5, not the guessed 3 and 4: a miss, and both guesses are dropped.
    pipeline.ahead(stream, [5], [6])
    assert (pipeline.hits, pipeline.misses) == (1, 2)
    assert set(pipeline._streams[id(stream)]) == {5, 6}
    assert torch.equal(pipeline.get(stream, 5), torch.full((2,), 5.0))
    # A key nobody asked ahead for is decoded in the calling thread, the same batch.
    assert torch.equal(pipeline.get(stream, 9), torch.full((2,), 9.0))
    # Another stream's guesses are its own.
    other = torch.Generator()
    pipeline.ahead(other, [6])
    assert (pipeline.hits, pipeline.misses) == (1, 3)
    pipeline.close()
    assert any(name.startswith("fm-optuna-decode") for name in decoder.threads)
    assert decoder.calls.count(9) == 1 and threading.current_thread().name in decoder.threads


def test_zero_workers_decodes_inline_and_starts_no_thread() -> None:
    decoder = Decoder()
    pipeline = Prefetcher(decoder, workers=0, prefetch=2)
    assert not pipeline.enabled
    stream = torch.Generator()
    pipeline.ahead(stream, [5], [6])
    assert decoder.calls == []  # no guess is decoded
    assert torch.equal(pipeline.get(stream, 5), torch.full((2,), 5.0))
    assert list(pipeline.ordered([7, 8])) == [pytest.approx(torch.full((2,), k)) for k in (7, 8)]
    assert decoder.threads == {threading.current_thread().name}
    assert pipeline._pool is None


def test_ordered_yields_in_order_and_cancels_the_rest_when_stopped() -> None:
    decoder = Decoder()
    pipeline = Prefetcher(decoder, workers=2, prefetch=1)
    keys = list(range(10))
    assert [int(batch[0]) for batch in pipeline.ordered(keys)] == keys
    stopped = pipeline.ordered(list(range(100, 200)))
    assert int(next(stopped)[0]) == 100
    stopped.close()  # a pruned candidate stops reading
    pipeline.close()
    # Only the chunks in flight (prefetch + 1 at most) were decoded beyond the first.
    assert len([key for key in decoder.calls if key >= 100]) <= 3


def test_a_failing_decode_raises_in_the_training_thread() -> None:
    def decode(key: int) -> torch.Tensor:
        raise OSError(f"cannot read {key}")

    pipeline = Prefetcher(decode, workers=1, prefetch=1)
    stream = torch.Generator()
    pipeline.ahead(stream, [], [1])
    with pytest.raises(OSError, match="cannot read 1"):
        pipeline.get(stream, 1)
    pipeline.close()


def full(key: int) -> torch.Tensor:
    return torch.full((2,), float(key))


def test_copies_get_no_threads_or_guesses_of_their_own() -> None:
    pipeline = Prefetcher(full, workers=2, prefetch=2)
    stream = torch.Generator()
    pipeline.ahead(stream, [], [1])
    for clone in (copy.deepcopy(pipeline), pickle.loads(pickle.dumps(pipeline))):
        assert clone._pool is None and not clone._streams
        assert not clone._streams and torch.equal(clone.get(stream, 1), torch.full((2,), 1.0))
        clone.close()
    pipeline.close()


def test_to_device_moves_nested_batches() -> None:
    batch = (torch.zeros(2), {"a": torch.ones(1)})
    moved = to_device(batch, torch.device("cpu"))
    assert torch.equal(moved[0], batch[0]) and torch.equal(moved[1]["a"], batch[1]["a"])
