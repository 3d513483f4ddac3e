"""NYUv2 scene understanding: segmentation, depth and surface normals on one shared network.

The paper's scene-understanding experiment (Jiang et al., 2023, after MTAN and LibMTL) on
NYUv2 in MTAN's preprocessed ``.npy`` layout, read from a local folder (``data_dir``; nothing is
ever downloaded)::

    data_dir/train/{image,label,depth,normal}/{i}.npy   795 images of 288 × 384
    data_dir/val/{image,label,depth,normal}/{i}.npy     654 images: MTAN's "val" is the test set

(see :mod:`fm_optuna.datasets.nyuv2` for the arrays). Tasks (:data:`TASKS`) share their inputs:
one batch of images per step serves every requested task.

- ``segmentation``: 13 classes, cross-entropy; metric ``miou`` (mean intersection over union,
  percent, higher is better) and ``pixel_accuracy`` (percent).
- ``depth``: L1 loss; metric ``abs_err`` (mean absolute error in metres, lower is better) and
  ``rel_err`` (mean of |error| / depth).
- ``normal``: 1 − cosine loss; metric ``mean_angle`` (mean angular error in degrees, lower is
  better), ``median_angle`` (to within 0.005°) and ``within_11_25``, ``within_22_5``,
  ``within_30`` (percent of pixels whose angular error is below 11.25°, 22.5°, 30°).

As MTAN does, unlabelled pixels (segmentation −1, depth 0, all-zero normals) count in neither
losses nor metrics. Metrics are pooled over every labelled pixel of the split (the confusion
matrix of the whole split for the IoU, classes absent from both prediction and ground truth left
out of the mean), so they do not depend on the evaluation batch size; LibMTL instead averages
per-batch depth errors, which differs slightly. Every task's metrics include ``loss``, its
training loss averaged over the split's labelled pixels.

Splits. The published layout has no validation split, and the paper selects Λ on validation
data of the target, so ``val_size`` training images (80 by default, leaving 715) chosen by a
permutation seeded with ``data_seed`` form the validation split; ``test`` is MTAN's ``val``
folder. ``limit`` caps the images of every split (the first ones of the training remainder, of the
carved validation images and of the test folder) for quick trials.

CPU use. At the native 288 × 384 a ResNet-18 step on 8 images takes seconds on a CPU;
``image_size = (H, W)`` resizes every split once on load (images bilinearly with antialiasing,
labels, depths and normals with nearest neighbours so that class ids, missing-pixel markers and
unit normals survive), and metrics are then computed at that resolution. Arrays are read from
disk for every batch unless ``in_memory`` (all splits, resized, kept on the device: ~4.6 GB at
native size, ~0.5 GB at 96 × 128). ``augment`` applies MTAN's random scale-crop (zoom by 1, 1.2
or 1.5 at a random position, depths divided by the zoom) with the step's generator.

Reading runs in ``workers`` background threads (default 2; 0 reads in the training thread),
``prefetch`` steps ahead of training (default 2) and chunks ahead of evaluation (see
:mod:`fm_optuna.datasets._pipeline`): positions and crops are still drawn from the branch's
generator in the training thread, so the batches — and a resumed run — are bit for bit those of
inline reading. On the CPU the workers also resize; on CUDA they pin the arrays, which are
copied without blocking and resized on the device, as inline.

Model: :class:`~fm_optuna.datasets.nyuv2.NYUv2Net`, a ResNet-18 trunk to stride 16 with one
DeepLab-style atrous head per task under ``model.heads``; a small cousin of the paper's
ImageNet-pretrained DeepLab-v3 ResNet-50. The trunk is randomly initialised, or loaded from a
local file (``weights``: a torchvision ResNet-18 state dict; ``layer4.*`` and ``fc.*`` are
ignored, see :mod:`fm_optuna.datasets._weights`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from fm_optuna.benchmarks._images import check_non_negative, check_positive, eval_mode
from fm_optuna.datasets._pipeline import (
    DEFAULT_PREFETCH,
    DEFAULT_WORKERS,
    Prefetcher,
    lookahead,
    to_device,
)
from fm_optuna.datasets._weights import load_trunk_weights
from fm_optuna.datasets.nyuv2 import NUM_CLASSES, NYUv2, NYUv2Net, nyuv2_losses
from fm_optuna.datasets.nyuv2 import TASKS as _DATA_TASKS
from fm_optuna.errors import invalid, one_of
from fm_optuna.problem._tasks import Problem, Split, Task, TaskMetrics

__all__ = [
    "DEFAULT_TARGET",
    "RUNTIME_OPTIONS",
    "TARGETS",
    "TASKS",
    "NYUv2Problem",
    "build",
    "resize",
    "scale_crop",
    "trunk_weights",
]

TASKS: tuple[Task, ...] = (
    Task("segmentation", metric="miou", higher_is_better=True),
    Task("depth", metric="abs_err", higher_is_better=False),
    Task("normal", metric="mean_angle", higher_is_better=False),
)
#: Options that change how fast batches come, never which: left out of a study's fingerprint.
RUNTIME_OPTIONS = ("workers", "prefetch")
TARGETS: tuple[str, ...] = _DATA_TASKS
DEFAULT_TARGET = "segmentation"
NATIVE_SIZE = (288, 384)
# The trunk has stride 16: at 32 pixels a side its features are still 2 × 2, so BatchNorm sees
# more than one value per channel even for a batch of one image.
MIN_SIDE = 32
# Images per evaluation forward (LibMTL's test batch size); bounds peak memory at native size.
EVAL_BATCH = 8
AUGMENT_SCALES = (1.0, 1.2, 1.5)
ANGLE_BINS = 18_000  # 0.01° bins over [0°, 180°] for the median angular error
ANGLE_THRESHOLDS = {"within_11_25": 11.25, "within_22_5": 22.5, "within_30": 30.0}
LAYOUT = "train/{image,label,depth,normal}/{i}.npy and val/{image,label,depth,normal}/{i}.npy"

Batch = tuple[torch.Tensor, dict[str, torch.Tensor]]
#: A read batch's identity: the split and the positions in it (its content).
_Key = tuple[str, tuple[int, ...]]
WEIGHTS = (
    "a torchvision ResNet-18 state dict (conv1 … layer3 used; layer4.*, fc.* ignored) "
    "or this benchmark's model's"
)
# torchvision's ResNet-18 children as NYUv2Net's trunk (an nn.Sequential) numbers them.
_TRUNK_INDEX = {"conv1": "0", "bn1": "1", "layer1": "4", "layer2": "5", "layer3": "6"}
_TRUNK_NAME = {index: name for name, index in _TRUNK_INDEX.items()}


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------


def _nearest(target: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize of ``[n, c, h, w]`` (``nearest-exact``: no half-pixel shift)."""
    return F.interpolate(target, size=size, mode="nearest-exact")


def _resize_targets(
    targets: dict[str, torch.Tensor], size: tuple[int, int]
) -> dict[str, torch.Tensor]:
    labels = _nearest(targets["segmentation"].unsqueeze(1).float(), size)
    return {
        "segmentation": labels.squeeze(1).round().long(),
        "depth": _nearest(targets["depth"], size),
        "normal": _nearest(targets["normal"], size),
    }


def resize(images: torch.Tensor, targets: dict[str, torch.Tensor], size: tuple[int, int]) -> Batch:
    """Images ``[n, 3, H, W]`` and their targets resized to ``size``.

    Images are resized bilinearly with antialiasing; labels, depths and normals with nearest
    neighbours, so class ids stay integers, missing pixels stay marked (−1, 0, zero vector) and
    normals stay unit vectors.
    """
    if tuple(images.shape[-2:]) == tuple(size):
        return images, targets
    images = F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)
    return images, _resize_targets(targets, size)


def scale_crop(
    images: torch.Tensor, targets: dict[str, torch.Tensor], generator: torch.Generator
) -> Batch:
    """MTAN's random scale-crop augmentation, drawn from ``generator``.

    Each image is zoomed by a factor s in :data:`AUGMENT_SCALES`: a window of ``1/s`` of its
    height and width at a random position is resized back to the full size, and its depths are
    divided by s (the scene looks s times closer). Normals are resized with nearest neighbours
    rather than MTAN's bilinear interpolation, which would blend in the zero vectors of missing
    pixels.
    """
    return _crop(images, targets, _crop_draws(len(images), generator))


def _crop_draws(n: int, generator: torch.Generator) -> list[list[float]]:
    """The scale-crop's draws for ``n`` images: a scale, a top and a left per image."""
    return torch.rand(n, 3, generator=generator, device=generator.device).tolist()


def _crop(
    images: torch.Tensor, targets: dict[str, torch.Tensor], draws: list[list[float]]
) -> Batch:
    _, _, height, width = images.shape
    size = (height, width)
    out_images: list[torch.Tensor] = []
    out_targets: dict[str, list[torch.Tensor]] = {task: [] for task in TARGETS}
    for k, (u_scale, u_top, u_left) in enumerate(draws):
        scale = AUGMENT_SCALES[min(int(u_scale * len(AUGMENT_SCALES)), len(AUGMENT_SCALES) - 1)]
        h, w = int(height / scale), int(width / scale)
        top = min(int(u_top * (height - h + 1)), height - h)
        left = min(int(u_left * (width - w + 1)), width - w)
        rows, cols = slice(top, top + h), slice(left, left + w)
        window = images[k : k + 1, :, rows, cols]
        out_images.append(F.interpolate(window, size=size, mode="bilinear", align_corners=False))
        cropped = {task: targets[task][k : k + 1, ..., rows, cols] for task in TARGETS}
        resized = _resize_targets(cropped, size)
        resized["depth"] = resized["depth"] / scale
        for task in TARGETS:
            out_targets[task].append(resized[task])
    return torch.cat(out_images), {task: torch.cat(parts) for task, parts in out_targets.items()}


class _Images:
    """One split: indices into an NYUv2 folder, resized on load, read lazily or kept in memory.

    Reading is two halves, so that the first can run in a background thread with the same
    result: :meth:`read` (files to CPU tensors, resized when the device is the CPU) and
    :meth:`finish` (to the device, resized there when it was not resized yet).
    """

    def __init__(
        self,
        dataset: NYUv2,
        indices: list[int],
        *,
        size: tuple[int, int] | None,
        device: torch.device,
        in_memory: bool,
    ) -> None:
        self.dataset = dataset
        self.indices = indices
        self.size = size
        self.device = device
        self._cache: Batch | None = None
        if in_memory:
            chunks = [
                self._read(indices[start : start + EVAL_BATCH])
                for start in range(0, len(indices), EVAL_BATCH)
            ]
            images = torch.cat([chunk[0] for chunk in chunks])
            targets = {task: torch.cat([chunk[1][task] for chunk in chunks]) for task in TARGETS}
            # Class ids −1..12 fit in a byte: 8x less memory than int64 at 288 × 384.
            targets["segmentation"] = targets["segmentation"].to(torch.int8)
            self._cache = (images, targets)

    def __len__(self) -> int:
        return len(self.indices)

    def _read(self, indices: Sequence[int]) -> Batch:
        return self.finish(self._load(indices))

    def _load(self, indices: Sequence[int]) -> Batch:
        items = [self.dataset[i] for i in indices]
        images = torch.stack([item[0] for item in items])
        targets = {task: torch.stack([item[1][task] for item in items]) for task in TARGETS}
        if self.size is not None and self.device.type == "cpu":
            return resize(images, targets, self.size)
        return images, targets

    def read(self, positions: Sequence[int]) -> Batch:
        """The files at ``positions``, as CPU tensors (resized when the device is the CPU)."""
        return self._load([self.indices[p] for p in positions])

    def finish(self, batch: Batch) -> Batch:
        """A :meth:`read` batch on the device, resized."""
        images, targets = to_device(batch, self.device)
        return (images, targets) if self.size is None else resize(images, targets, self.size)

    @property
    def cached(self) -> bool:
        return self._cache is not None

    def batch(self, positions: Sequence[int]) -> Batch:
        """The images and targets at ``positions`` (0 .. len − 1) of this split."""
        if self._cache is None:
            return self.finish(self.read(positions))
        index = torch.as_tensor(list(positions), dtype=torch.long, device=self.device)
        images, targets = self._cache
        batch = {task: value[index] for task, value in targets.items()}
        batch["segmentation"] = batch["segmentation"].long()
        return images[index], batch

    def chunks(self) -> Iterator[Batch]:
        """The whole split in order, :data:`EVAL_BATCH` images at a time."""
        for start in range(0, len(self), EVAL_BATCH):
            yield self.batch(range(start, min(start + EVAL_BATCH, len(self))))


# --------------------------------------------------------------------------------------------
# Metrics, pooled over every labelled pixel of a split
# --------------------------------------------------------------------------------------------


class _Segmentation:
    def __init__(self, device: torch.device) -> None:
        self.confusion = torch.zeros(NUM_CLASSES * NUM_CLASSES, dtype=torch.long, device=device)
        self.loss = torch.zeros((), dtype=torch.float64, device=device)

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        valid = (labels >= 0) & (labels < NUM_CLASSES)
        labels = labels.where(valid, -1)
        self.loss += F.cross_entropy(logits, labels, ignore_index=-1, reduction="sum").double()
        predicted = logits.argmax(dim=1)
        self.confusion += torch.bincount(
            NUM_CLASSES * labels[valid] + predicted[valid], minlength=NUM_CLASSES**2
        )

    def result(self) -> TaskMetrics:
        matrix = self.confusion.view(NUM_CLASSES, NUM_CLASSES).double()  # [truth, predicted]
        hits = matrix.diagonal()
        union = matrix.sum(0) + matrix.sum(1) - hits
        pixels = matrix.sum()
        present = union > 0
        miou = (hits[present] / union[present]).mean() if present.any() else torch.tensor(0.0)
        return {
            "miou": 100.0 * float(miou) if pixels > 0 else float("nan"),
            "pixel_accuracy": 100.0 * float(hits.sum() / pixels) if pixels > 0 else float("nan"),
            "loss": float(self.loss / pixels) if pixels > 0 else float("nan"),
        }


class _Depth:
    def __init__(self, device: torch.device) -> None:
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)  # |e|, |e| / d, pixels

    def update(self, predicted: torch.Tensor, depth: torch.Tensor) -> None:
        valid = depth != 0
        error = (predicted - depth).abs()[valid].double()
        truth = depth[valid].double()
        self.sums += torch.stack([error.sum(), (error / truth).sum(), error.new_tensor(len(error))])

    def result(self) -> TaskMetrics:
        error, relative, pixels = self.sums.tolist()
        if pixels == 0:
            return {"abs_err": float("nan"), "rel_err": float("nan"), "loss": float("nan")}
        return {"abs_err": error / pixels, "rel_err": relative / pixels, "loss": error / pixels}


class _Normal:
    def __init__(self, device: torch.device) -> None:
        # 1 − cos, angle in degrees, then one count per threshold, then the pixel count.
        self.sums = torch.zeros(3 + len(ANGLE_THRESHOLDS), dtype=torch.float64, device=device)
        self.histogram = torch.zeros(ANGLE_BINS, dtype=torch.float64, device=device)

    def update(self, predicted: torch.Tensor, normal: torch.Tensor) -> None:
        valid = normal.abs().sum(dim=1) != 0
        cosine = (predicted * normal).sum(dim=1)[valid]
        angle = torch.rad2deg(torch.acos(cosine.clamp(-1.0, 1.0)))
        within = [(angle < threshold).sum() for threshold in ANGLE_THRESHOLDS.values()]
        self.sums += torch.stack(
            [(1 - cosine).sum(), angle.sum(), *within, angle.new_tensor(len(angle))]
        ).double()
        self.histogram += torch.histc(angle, bins=ANGLE_BINS, min=0.0, max=180.0).double()

    def result(self) -> TaskMetrics:
        loss, angle, *within, pixels = self.sums.tolist()
        if pixels == 0:
            nan = float("nan")
            names = ("mean_angle", "median_angle", *ANGLE_THRESHOLDS, "loss")
            return dict.fromkeys(names, nan)
        # The median is the mean of the values of rank ⌊(n+1)/2⌋ and ⌊n/2⌋ + 1 (one value when
        # n is odd), each placed at the centre of its 0.01° bin: within 0.005° of the exact one.
        cumulative = self.histogram.cumsum(0)
        ranks = torch.tensor(
            [(pixels + 1) // 2, pixels // 2 + 1], dtype=cumulative.dtype, device=cumulative.device
        )
        middle = float(torch.searchsorted(cumulative, ranks).double().mean())
        return {
            "mean_angle": angle / pixels,
            "median_angle": (middle + 0.5) * 180.0 / ANGLE_BINS,
            **{
                name: 100.0 * count / pixels
                for name, count in zip(ANGLE_THRESHOLDS, within, strict=True)
            },
            "loss": loss / pixels,
        }


_METERS = {"segmentation": _Segmentation, "depth": _Depth, "normal": _Normal}


# --------------------------------------------------------------------------------------------
# The problem
# --------------------------------------------------------------------------------------------


class NYUv2Problem(Problem):
    """Segmentation, depth and normals on one batch of NYUv2 images per step.

    Use :func:`build` (or ``build_problem("nyuv2", ...)``) rather than the constructor.
    """

    name = "nyuv2"
    tasks = TASKS

    def __init__(
        self,
        *,
        target: str,
        seed: int,
        device: torch.device,
        data_dir: str,
        batch_size: int,
        val_size: int,
        data_seed: int,
        limit: int | None,
        image_size: tuple[int, int] | None,
        augment: bool,
        in_memory: bool,
        workers: int = 0,
        prefetch: int = DEFAULT_PREFETCH,
        weights: str | None = None,
    ) -> None:
        self.target = target
        self.seed = seed
        self.device = device
        self.batch_size = batch_size
        self.augment = augment
        self.image_size = image_size
        self.options: dict[str, object] = {
            "data_dir": data_dir,
            "val_size": val_size,
            "data_seed": data_seed,
            "limit": limit,
            "image_size": "native" if image_size is None else f"{image_size[0]}x{image_size[1]}",
            "augment": augment,
            "in_memory": in_memory,
            "workers": workers,
            "prefetch": prefetch,
            "weights": "none" if weights is None else weights,
        }
        # Read and checked now, before anything trains; loaded into every model made.
        self._weights = None if weights is None else trunk_weights(weights)
        self._pipeline: Prefetcher[_Key, Batch] = Prefetcher(
            self._decode, workers=workers, prefetch=prefetch, pin=device.type == "cuda"
        )
        # The loader checks the layout; its ConfigError names `data_dir` and the missing files.
        train, test = NYUv2(data_dir, "train"), NYUv2(data_dir, "val")
        if val_size >= len(train):
            raise invalid(
                "val_size", val_size, f"a positive integer below the {len(train)} training images"
            )
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(data_seed))
        carved = order.tolist()
        self.indices: dict[str, list[int]] = {
            "train": carved[val_size:][:limit],
            "val": carved[:val_size][:limit],
            "test": list(range(len(test)))[:limit],
        }
        sources = {"train": train, "val": train, "test": test}
        self._splits = {
            split: _Images(
                sources[split], indices, size=image_size, device=device, in_memory=in_memory
            )
            for split, indices in self.indices.items()
        }

    def make_model(self) -> NYUv2Net:
        """ResNet-18 trunk to stride 16 (random, or the ``weights`` file's) and one atrous head
        per task (random)."""
        model = NYUv2Net(TARGETS)
        if self._weights is not None:
            # Checked at build: every trunk tensor is there (BatchNorm counters may be absent).
            model.trunk.load_state_dict(self._weights, strict=False)
        return model

    def _decode(self, key: _Key) -> Batch:
        split, positions = key
        return self._splits[split].read(positions)

    def _draw(self, generator: torch.Generator) -> tuple[_Key, list[list[float]] | None]:
        """One step's draws, in the order inline reading always made them: the positions (with
        replacement), then the scale-crops."""
        positions = torch.randint(
            len(self._splits["train"]),
            (self.batch_size,),
            generator=generator,
            device=generator.device,
        ).tolist()
        crops = _crop_draws(self.batch_size, generator) if self.augment else None
        return ("train", tuple(positions)), crops

    def batch(self, split: str, positions: Sequence[int]) -> Batch:
        """The (resized, not augmented) images and targets at ``positions`` of a split.

        ``split`` is ``"train"``, ``"val"`` (carved from the training folder) or ``"test"``.
        """
        if split not in self._splits:
            raise one_of("split", split, self._splits)
        return self._splits[split].batch(positions)

    def _check(self, tasks: Sequence[str]) -> None:
        for task in tasks:
            if task not in TARGETS:
                raise one_of("task", task, TARGETS)

    def task_losses(
        self, model: nn.Module, tasks: Sequence[str], generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        """One batch of images (with replacement) serves every requested task.

        The model computes every head; only the requested tasks' losses are returned, so the
        other heads get no gradient.
        """
        self._check(tasks)
        if not tasks:
            return {}
        train = self._splits["train"]
        key, crops = self._draw(generator)
        if train.cached:
            images, targets = train.batch(key[1])
        else:
            if self._pipeline.enabled:
                ahead = lookahead(
                    generator, lambda copy: self._draw(copy)[0], self._pipeline.prefetch
                )
                self._pipeline.ahead(generator, [key], ahead)
            images, targets = train.finish(self._pipeline.get(generator, key))
        if crops is not None:
            images, targets = _crop(images, targets, crops)
        outputs = model(images)
        losses = nyuv2_losses({task: outputs[task] for task in set(tasks)}, targets)
        return {task: losses[task] for task in tasks}

    def evaluate(
        self, model: nn.Module, split: Split, tasks: Sequence[str] | None = None
    ) -> dict[str, TaskMetrics]:
        """Each task's metrics (see the module docstring) pooled over the split's pixels."""
        if split not in ("val", "test"):
            raise one_of("split", split, ("val", "test"))
        names = TARGETS if tasks is None else tuple(tasks)
        self._check(names)
        meters = {task: _METERS[task](self.device) for task in set(names)}
        with eval_mode(model), torch.inference_mode():
            for images, targets in self._chunks(split):
                outputs = model(images)
                for task, meter in meters.items():
                    meter.update(outputs[task], targets[task])
        results = {task: meter.result() for task, meter in meters.items()}
        return {task: results[task] for task in names}

    def _chunks(self, split: str) -> Iterator[Batch]:
        """The whole split in order, the next chunks read in the background while one is used."""
        images = self._splits[split]
        if images.cached:
            yield from images.chunks()
            return
        starts = range(0, len(images), EVAL_BATCH)
        keys = [(split, tuple(range(s, min(s + EVAL_BATCH, len(images))))) for s in starts]
        for batch in self._pipeline.ordered(keys):
            yield images.finish(batch)

    def split_sizes(self) -> dict[str, int]:
        """Images per split (after the validation carve and ``limit``)."""
        return {split: len(indices) for split, indices in self.indices.items()}

    def describe(self) -> dict[str, object]:
        return {
            "benchmark": self.name,
            "target": self.target,
            "batch_size": self.batch_size,
            **self.options,
            **{f"{split}_images": size for split, size in self.split_sizes().items()},
        }


def _trunk_key(key: str) -> str | None:
    """A key of a ``weights`` file as the trunk's key (``None``: ignored on purpose)."""
    if key.startswith(("heads.", "fc.", "layer4.")):
        return None
    if key.startswith("trunk."):
        return key.removeprefix("trunk.")
    child, dot, rest = key.partition(".")
    return _TRUNK_INDEX[child] + dot + rest if child in _TRUNK_INDEX else key


def _torchvision_key(key: str) -> str:
    index, dot, rest = key.partition(".")
    return _TRUNK_NAME.get(index, index) + dot + rest


def trunk_weights(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The trunk's tensors from a ``weights`` file, checked against the trunk's shapes."""
    with torch.device("meta"):  # shapes only: no memory, and torch's RNG is not drawn from
        trunk = NYUv2Net(()).trunk.state_dict()
    return load_trunk_weights(path, trunk, _trunk_key, WEIGHTS, source_key=_torchvision_key)


def _image_size(image_size: object) -> tuple[int, int] | None:
    if image_size is None:
        return None
    allowed = f"null (native 288 × 384) or [height, width], two integers ≥ {MIN_SIDE}"
    if not isinstance(image_size, list | tuple) or len(image_size) != 2:
        raise invalid("image_size", image_size, allowed)
    for side in image_size:
        if isinstance(side, bool) or not isinstance(side, int) or side < MIN_SIDE:
            raise invalid("image_size", image_size, allowed)
    return int(image_size[0]), int(image_size[1])


def build(
    *,
    target: str,
    seed: int,
    device: torch.device,
    data_dir: str | None = None,
    batch_size: int = 8,
    val_size: int = 80,
    data_seed: int = 0,
    limit: int | None = None,
    image_size: Sequence[int] | None = None,
    augment: bool = False,
    in_memory: bool = False,
    workers: int = DEFAULT_WORKERS,
    prefetch: int = DEFAULT_PREFETCH,
    weights: str | None = None,
) -> NYUv2Problem:
    """Build the NYUv2 problem; bad options raise :class:`~fm_optuna.errors.ConfigError`.

    Args:
        target: ``"segmentation"``, ``"depth"`` or ``"normal"``.
        seed: The training seed (the splits depend on ``data_seed`` only).
        device: Where batches are computed (and the arrays kept with ``in_memory``).
        data_dir: The folder holding NYUv2 in MTAN's layout (required).
        batch_size: Images per step, shared by every task (8 as in LibMTL's NYUv2 example).
        val_size: Training images carved out as the validation split.
        data_seed: Seed of the validation carve.
        limit: At most this many images per split (``None``: all).
        image_size: ``(height, width)`` to resize every split to (``None``: native 288 × 384).
        augment: MTAN's random scale-crop on training batches.
        in_memory: Keep the (resized) arrays on ``device`` instead of reading every batch.
        workers: Background threads reading (and on the CPU resizing) batches; 0 reads in the
            training thread. The batches are the same either way.
        prefetch: Steps read ahead of training (and chunks ahead of evaluation).
        weights: A local file of pretrained weights for the ResNet-18 trunk (a torchvision
            ``resnet18`` state dict; ``layer4.*``, ``fc.*`` ignored; see
            :mod:`fm_optuna.datasets._weights`); default: random initialisation.

    Example:
        >>> problem = build(
        ...     target="depth", seed=0, device=torch.device("cpu"), data_dir="data/nyuv2"
        ... )  # doctest: +SKIP
    """
    if target not in TARGETS:
        raise one_of("target", target, TARGETS)
    if data_dir is None or not isinstance(data_dir, str | Path):
        raise invalid(
            "data_dir",
            data_dir,
            f"the folder holding NYUv2 in MTAN's .npy layout ({LAYOUT}); it is required",
        )
    check_positive(batch_size=batch_size, val_size=val_size)
    check_non_negative(data_seed=data_seed)
    if limit is not None:
        check_positive(limit=limit)
    size = _image_size(image_size)
    for name, flag in (("augment", augment), ("in_memory", in_memory)):
        if not isinstance(flag, bool):
            raise invalid(name, flag, "true or false")
    check_non_negative(workers=workers, prefetch=prefetch)
    if weights is not None and not isinstance(weights, str | os.PathLike):
        raise invalid("weights", weights, "the path of a file of pretrained weights")
    return NYUv2Problem(
        target=target,
        seed=seed,
        device=device,
        data_dir=str(data_dir),
        batch_size=batch_size,
        val_size=val_size,
        data_seed=data_seed,
        limit=limit,
        image_size=size,
        augment=augment,
        in_memory=in_memory,
        workers=workers,
        prefetch=prefetch,
        weights=None if weights is None else str(weights),
    )
