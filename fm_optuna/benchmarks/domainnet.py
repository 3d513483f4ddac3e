"""DomainNet: one 345-way classification task per visual domain, read from a local folder.

The paper's auxiliary-domain experiment (Jiang et al., 2023, after Peng et al.'s DomainNet): six
domains — ``clipart``, ``infograph``, ``painting``, ``quickdraw``, ``real`` and ``sketch`` — share
the same 345 object classes; one domain is the target and the others are auxiliary sources. Each
domain is a task with its own images and its own classifier head on a shared trunk.

Layout (the published release, as read by :class:`fm_optuna.datasets.domainnet.DomainNet`)::

    data_dir/<domain>/<class>/<name>.jpg
    data_dir/image_list/<domain>_train.txt   lines "<domain>/<class>/<name>.jpg <label>"
    data_dir/image_list/<domain>_test.txt

Nothing is downloaded: ``data_dir`` is required. A copy may hold only some domains; the
``domains`` option restricts the tasks to those present (the target must be one of them).

Splits. The release has no validation list, so each domain's validation images are carved from
its training list with a permutation seeded by ``data_seed`` and the domain (so restricting
``domains`` never changes another domain's split): ``val_size`` images, or a ``val_fraction`` of
the list (default 10 %). The rest are training images; the test split is the domain's test list.
``limit`` caps the images taken from each list (a seeded subset, since the lists are sorted by
class) so that a CPU try does not touch every file. A ``<domain>_val.txt`` list, when present,
is not read: validation is always carved as above, so results do not depend on who made it.

Images are files and are decoded lazily with PIL, per batch: ``image_size × image_size`` (the
paper's 224; e.g. 32 on a CPU), ImageNet normalisation. Training images are flipped horizontally
with probability ½ (``augment``), drawn from the run's generator; evaluation is deterministic. The
target's validation images are evaluated at every merge candidate, so they are kept decoded in
memory (``uint8``, ~150 KB per image at 224 px) after their first pass (``cache_val``).

Decoding runs in ``workers`` background threads (default 2; 0 decodes in the training thread),
``prefetch`` steps ahead of training (default 2) and chunks ahead of evaluation (see
:mod:`fm_optuna.datasets._pipeline`): the indices and flips are still drawn from the branch's
generator in the training thread, so the batches — and a resumed run — are bit for bit those of
inline decoding; on CUDA the decoded images are pinned and copied without blocking.

Each requested task draws its own batch of ``batch_size`` images from its own domain every step.
Metrics: top-1 accuracy in percent (higher is better) and the mean cross-entropy as ``loss``.

Model: :class:`~fm_optuna.datasets.domainnet.DomainNetNet`, torchvision's ResNet-18 with one
linear head per domain in ``model.heads``; randomly initialised, or with its trunk loaded from
a local file of pretrained weights (``weights``: a torchvision ResNet-18 state dict, ``fc.*``
ignored; see :mod:`fm_optuna.datasets._weights`). The paper fine-tunes an ImageNet-pretrained
ResNet-101; weights are never downloaded here.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.nn import functional as F

from fm_optuna.benchmarks._images import (
    check_fraction,
    check_non_negative,
    check_positive,
    eval_mode,
)
from fm_optuna.datasets._folder import folder_error
from fm_optuna.datasets._pipeline import (
    DEFAULT_PREFETCH,
    DEFAULT_WORKERS,
    Prefetcher,
    lookahead,
)
from fm_optuna.datasets._weights import load_trunk_weights
from fm_optuna.datasets.domainnet import DOMAINS, NUM_CLASSES, DomainNet, DomainNetNet
from fm_optuna.errors import ConfigError, invalid, one_of
from fm_optuna.problem._tasks import Problem, Split, Task, TaskMetrics

if TYPE_CHECKING:
    from PIL.Image import Image
    from torch import nn

__all__ = [
    "DEFAULT_TARGET",
    "DOMAINS",
    "RUNTIME_OPTIONS",
    "TARGETS",
    "DomainNetProblem",
    "build",
    "parse_domains",
    "trunk_weights",
]

#: Options that change how fast batches come, never which: left out of a study's fingerprint.
RUNTIME_OPTIONS = ("workers", "prefetch")
TARGETS: tuple[str, ...] = DOMAINS
DEFAULT_TARGET = "clipart"
DEFAULT_VAL_FRACTION = 0.1
MIN_IMAGE_SIZE = 32  # ResNet-18 downsamples by 32: smaller images vanish before the last block
EVAL_BATCH = 64  # images per evaluation forward: a ResNet-18 chunk at 224 px stays ~100 MB
MEAN = (0.485, 0.456, 0.406)  # ImageNet statistics, as the dataset module's default_transform
STD = (0.229, 0.224, 0.225)
# Independent random streams (with data_seed and the domain's index in DOMAINS).
_TRAIN_LIST, _TEST_LIST = 1, 2
WEIGHTS = "a torchvision ResNet-18 state dict (fc.* ignored) or this benchmark's model's"

#: A decoded batch's identity: split, domain and positions in the split (its content).
_Key = tuple[str, str, tuple[int, ...]]
#: One task's draws for a step: the task, the positions drawn and the flips (None: no augment).
_Draw = tuple[str, torch.Tensor, torch.Tensor | None]


# --------------------------------------------------------------------------------------------
# Reading images
# --------------------------------------------------------------------------------------------


class ResizeToUint8:
    """PIL image → ``uint8 [3, size, size]`` tensor (bilinear resize, as torchvision's Resize).

    Normalisation happens later on float batches, so decoded images can be cached as bytes (a
    quarter of the memory of floats).
    """

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, image: Image) -> torch.Tensor:
        from PIL import Image as PILImage

        resized = image.resize((self.size, self.size), PILImage.BILINEAR)
        pixels = np.asarray(resized, dtype=np.uint8)
        return torch.from_numpy(pixels.copy()).permute(2, 0, 1).contiguous()


def normalise(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``uint8 [n, 3, s, s]`` to ImageNet-normalised floats on ``device``, channels-last.

    The same values as ``ToTensor`` then ``Normalize``; channels-last is the faster layout for
    oneDNN's convolutions on CPU.
    """
    mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=device).view(1, 3, 1, 1)
    moved = images.to(device=device, non_blocking=images.is_pinned())  # pinned: an async copy
    floats = moved.to(dtype=torch.float32).div_(255.0).sub_(mean).div_(std)
    return floats.contiguous(memory_format=torch.channels_last)


def parse_domains(domains: str | Sequence[str] | None) -> tuple[str, ...]:
    """The ``domains`` option as a tuple in :data:`DOMAINS` order (``None``: all six).

    Accepts ``"clipart,sketch"`` (a CLI or TOML string) or a list; order does not matter (tasks
    always follow :data:`DOMAINS`, so the same copy gives the same task order).
    """
    if domains is None:
        return DOMAINS
    if isinstance(domains, str):
        names = [name.strip() for name in domains.split(",") if name.strip()]
    elif isinstance(domains, list | tuple) and all(isinstance(name, str) for name in domains):
        names = [name.strip() for name in domains]
    else:
        raise invalid("domains", domains, "a comma-separated string or a list of domain names")
    allowed = "a non-empty list of distinct domains among " + ", ".join(DOMAINS)
    if not names or len(set(names)) != len(names) or any(name not in DOMAINS for name in names):
        raise invalid("domains", ",".join(names) if names else domains, allowed)
    return tuple(domain for domain in DOMAINS if domain in names)


def check_folder(data_dir: Path, domains: Sequence[str]) -> None:
    """Raise one ConfigError naming every missing list or domain folder of ``domains``.

    Checked before any list is read, so a partial copy is reported at once, with the domains
    that *are* present and the option that restricts the tasks to them.
    """
    layout = [
        "image_list/<domain>_train.txt",
        "image_list/<domain>_test.txt",
        "<domain>/<class>/<image>.jpg (as listed)",
    ]
    if not data_dir.is_dir():
        raise folder_error("DomainNet", data_dir, layout, [str(data_dir)])

    def needed(domain: str) -> list[str]:
        return [f"image_list/{domain}_train.txt", f"image_list/{domain}_test.txt", domain]

    missing = [entry for d in domains for entry in needed(d) if not (data_dir / entry).exists()]
    if missing:
        present = [d for d in DOMAINS if all((data_dir / e).exists() for e in needed(d))]
        hint = (
            f" Domains present: {', '.join(present)}; restrict the tasks to them with `domains`."
            if present
            else ""
        )
        error = folder_error("DomainNet", data_dir, layout, missing)
        raise ConfigError(f"{error}{hint}")


def _trunk_key(key: str) -> str | None:
    """A key of a ``weights`` file as the trunk's key (``None``: ignored on purpose)."""
    if key.startswith(("fc.", "heads.")):
        return None
    return key.removeprefix("trunk.")


def trunk_weights(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The trunk's tensors from a ``weights`` file, checked against the trunk's shapes."""
    with torch.device("meta"):  # shapes only: no memory, and torch's RNG is not drawn from
        trunk = DomainNetNet((), num_classes=NUM_CLASSES).trunk.state_dict()
    return load_trunk_weights(path, trunk, _trunk_key, WEIGHTS)


def _seeded_order(n: int, data_seed: int, domain: str, stream: int) -> np.ndarray:
    index = DOMAINS.index(domain)
    return np.random.default_rng([data_seed, stream, index]).permutation(n)


# --------------------------------------------------------------------------------------------
# The problem
# --------------------------------------------------------------------------------------------


class DomainNetProblem(Problem):
    """One classification task per domain, each with its own images, on a shared ResNet-18.

    Use :func:`build` (or ``build_problem("domainnet", ...)``) rather than the constructor.
    """

    name = "domainnet"

    def __init__(
        self,
        *,
        target: str,
        seed: int,
        device: torch.device,
        data_dir: Path,
        domains: tuple[str, ...],
        batch_size: int,
        image_size: int,
        limit: int | None,
        val_size: int | None,
        val_fraction: float,
        data_seed: int,
        augment: bool,
        cache_val: bool,
        workers: int = 0,
        prefetch: int = DEFAULT_PREFETCH,
        weights: str | None = None,
    ) -> None:
        self.target = target
        self.seed = seed
        self.device = device
        self.data_dir = data_dir
        self.batch_size = batch_size
        self.image_size = image_size
        self.augment = augment
        self.cache_val = cache_val
        self.tasks = tuple(Task(domain, metric="accuracy") for domain in domains)
        self.options: dict[str, object] = {
            "data_dir": str(data_dir),
            "domains": ",".join(domains),
            "image_size": image_size,
            "limit": "none" if limit is None else limit,
            "val_size": "none" if val_size is None else val_size,
            "val_fraction": "none" if val_size is not None else val_fraction,
            "data_seed": data_seed,
            "augment": augment,
            "cache_val": cache_val,
            "workers": workers,
            "prefetch": prefetch,
            "weights": "none" if weights is None else weights,
        }
        # Read and checked now, before anything trains; loaded into every model made.
        self._weights = None if weights is None else trunk_weights(weights)
        self._pipeline: Prefetcher[_Key, torch.Tensor] = Prefetcher(
            self._decode, workers=workers, prefetch=prefetch, pin=device.type == "cuda"
        )

        check_folder(data_dir, domains)
        transform = ResizeToUint8(image_size)
        # Per split and domain: the dataset the images come from and the indices into it.
        self._lists: dict[str, dict[str, DomainNet]] = {"train": {}, "test": {}}
        self._index: dict[str, dict[str, np.ndarray]] = {"train": {}, "val": {}, "test": {}}
        self._labels: dict[str, dict[str, torch.Tensor]] = {"train": {}, "val": {}, "test": {}}
        self._cache: dict[str, torch.Tensor] = {}
        for domain in domains:
            # The loader checks every listed image and names the missing ones (and `data_dir`).
            train_list = DomainNet(data_dir, domain, "train", transform=transform)
            test_list = DomainNet(data_dir, domain, "test", transform=transform)
            self._lists["train"][domain] = train_list
            self._lists["test"][domain] = test_list

            pool = _seeded_order(len(train_list), data_seed, domain, _TRAIN_LIST)[:limit]
            n_val = val_size if val_size is not None else round(val_fraction * len(pool))
            n_val = max(n_val, 1)
            if n_val >= len(pool):
                parameter = "val_size" if val_size is not None else "val_fraction"
                value = val_size if val_size is not None else val_fraction
                used = "after `limit`" if limit is not None else "in its list"
                raise invalid(
                    parameter,
                    value,
                    f"small enough to leave training images: {domain} has {len(pool)} training "
                    f"images {used}, so at most {len(pool) - 1} can be validation images",
                )
            self._index["val"][domain] = pool[:n_val]
            self._index["train"][domain] = pool[n_val:]
            test = _seeded_order(len(test_list), data_seed, domain, _TEST_LIST)[:limit]
            self._index["test"][domain] = np.sort(test)
            for split, source in (("train", train_list), ("val", train_list), ("test", test_list)):
                labels = [source.samples[i][1] for i in self._index[split][domain]]
                self._labels[split][domain] = torch.tensor(labels, dtype=torch.long, device=device)

    def _source(self, split: str) -> str:
        return "test" if split == "test" else "train"

    def _read(self, split: str, domain: str, positions: Sequence[int]) -> torch.Tensor:
        """Decode the images at ``positions`` of a domain's split: ``uint8 [n, 3, s, s]``."""
        dataset = self._lists[self._source(split)][domain]
        index = self._index[split][domain]
        return torch.stack([dataset[int(index[p])][0] for p in positions])

    def _decode(self, key: _Key) -> torch.Tensor:
        split, domain, positions = key
        return self._read(split, domain, positions)

    def _check_task(self, task: str) -> None:
        if task not in self._labels["train"]:
            raise one_of("task", task, self.task_names)

    def make_model(self) -> DomainNetNet:
        """A ResNet-18 trunk (random, or the ``weights`` file's) and one 345-way head per
        domain (random)."""
        model = DomainNetNet(self.task_names, num_classes=NUM_CLASSES)
        if self._weights is not None:
            # Checked at build: every trunk tensor is there (BatchNorm counters may be absent).
            model.trunk.load_state_dict(self._weights, strict=False)
        return model.to(self.device)

    def _draw(self, tasks: Sequence[str], generator: torch.Generator) -> list[_Draw]:
        """One step's random draws, in the order inline decoding always made them: per task,
        the positions (with replacement), then the flips."""
        draws: list[_Draw] = []
        for task in tasks:
            self._check_task(task)
            size = len(self._labels["train"][task])
            draw = torch.randint(size, (self.batch_size,), generator=generator, device=self.device)
            flip = None
            if self.augment:
                flip = torch.rand(self.batch_size, generator=generator, device=self.device) < 0.5
            draws.append((task, draw, flip))
        return draws

    def _keys(self, draws: Sequence[_Draw]) -> list[_Key]:
        return [("train", task, tuple(draw.tolist())) for task, draw, _ in draws]

    def task_losses(
        self, model: nn.Module, tasks: Sequence[str], generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        """Per task: a batch drawn from its own domain's training images, cross-entropy.

        Indices (with replacement) and flips come from ``generator`` only, so a seed fixes the
        batches; the images are decoded from disk by the background workers, which guess the
        next steps' draws on a copy of ``generator`` (the same tasks again), or here when they
        guessed wrong.
        """
        draws = self._draw(tasks, generator)
        keys = self._keys(draws)
        if self._pipeline.enabled:
            ahead = lookahead(
                generator, lambda copy: self._keys(self._draw(tasks, copy)), self._pipeline.prefetch
            )
            self._pipeline.ahead(generator, keys, (key for step in ahead for key in step))
        losses: dict[str, torch.Tensor] = {}
        for (task, draw, flip), key in zip(draws, keys, strict=True):
            images = normalise(self._pipeline.get(generator, key), self.device)
            if flip is not None:
                images = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
            losses[task] = F.cross_entropy(model(images, task), self._labels["train"][task][draw])
        return losses

    def _chunks(self, split: str, task: str) -> Iterator[torch.Tensor]:
        """The split's images in evaluation chunks (the target's val from memory once read),
        the next ones decoding in the background while one is evaluated."""
        n = len(self._labels[split][task])
        starts = range(0, n, EVAL_BATCH)
        cached = split == "val" and task == self.target and self.cache_val
        if cached and task in self._cache:
            images = self._cache[task]
            yield from (images[start : start + EVAL_BATCH] for start in starts)
            return
        keys = [(split, task, tuple(range(s, min(s + EVAL_BATCH, n)))) for s in starts]
        chunks: list[torch.Tensor] = []
        for chunk in self._pipeline.ordered(keys):
            if cached:
                chunks.append(chunk)
            yield chunk
        if cached:
            self._cache[task] = torch.cat(chunks)

    @torch.inference_mode()
    def evaluate(
        self, model: nn.Module, split: Split, tasks: Sequence[str] | None = None
    ) -> dict[str, TaskMetrics]:
        """Top-1 accuracy (percent) and mean cross-entropy of each task on its domain's split."""
        if split not in ("val", "test"):
            raise one_of("split", split, ("val", "test"))
        names = self.task_names if tasks is None else tuple(tasks)
        results: dict[str, TaskMetrics] = {}
        with eval_mode(model):
            for task in names:
                self._check_task(task)
                labels = self._labels[split][task]
                correct = torch.zeros((), dtype=torch.long, device=self.device)
                loss = torch.zeros((), dtype=torch.float64, device=self.device)
                start = 0
                for chunk in self._chunks(split, task):
                    logits = model(normalise(chunk, self.device), task)
                    truth = labels[start : start + len(chunk)]
                    loss += F.cross_entropy(logits, truth, reduction="sum").double()
                    correct += (logits.argmax(1) == truth).sum()
                    start += len(chunk)
                n = max(len(labels), 1)
                results[task] = {
                    "accuracy": correct.item() * 100.0 / n,
                    "loss": loss.item() / n,
                }
        return results

    def split_sizes(self) -> dict[str, dict[str, int]]:
        """Number of images per domain and split."""
        return {
            task: {split: len(self._labels[split][task]) for split in ("train", "val", "test")}
            for task in self.task_names
        }

    def image_paths(self, split: str, task: str) -> list[Path]:
        """The files of a domain's split, in evaluation order (train: the pool order)."""
        dataset = self._lists[self._source(split)][task]
        return [dataset.samples[int(i)][0] for i in self._index[split][task]]

    def describe(self) -> dict[str, object]:
        description: dict[str, object] = {
            "benchmark": self.name,
            "target": self.target,
            "batch_size": self.batch_size,
            **self.options,
        }
        for task, sizes in self.split_sizes().items():
            for split, size in sizes.items():
                description[f"{task}_{split}"] = size
        return description


def build(
    *,
    target: str,
    seed: int,
    device: torch.device,
    data_dir: str | os.PathLike[str] | None = None,
    domains: str | Sequence[str] | None = None,
    batch_size: int = 32,
    image_size: int = 224,
    limit: int | None = None,
    val_size: int | None = None,
    val_fraction: float | None = None,
    data_seed: int = 0,
    augment: bool = True,
    cache_val: bool = True,
    workers: int = DEFAULT_WORKERS,
    prefetch: int = DEFAULT_PREFETCH,
    weights: str | None = None,
) -> DomainNetProblem:
    """Build the DomainNet problem; bad options raise :class:`~fm_optuna.errors.ConfigError`.

    Args:
        target: One of :data:`TARGETS`; it must be among ``domains``.
        seed: The training seed (the splits depend on ``data_seed`` only).
        device: Where batches are put and the model runs.
        data_dir: The DomainNet folder (required; see the module docstring for the layout).
        domains: The domains to use as tasks, ``"clipart,sketch"`` or a list (default: all six).
        batch_size: Images per domain per step (the paper: 32).
        image_size: Side of the resized square images (the paper: 224; 32 for a CPU try).
        limit: At most this many images from each domain's train list (before the validation
            carve) and from its test list, a seeded subset (default: all).
        val_size: Validation images carved from each domain's train list.
        val_fraction: Or the share of each train list carved (default 0.1 when neither is set).
        data_seed: Seed of the validation carve and of the ``limit`` subsets.
        augment: Flip training images horizontally with probability ½.
        cache_val: Keep the target's decoded validation images in memory after the first pass.
        workers: Background threads decoding images (0: in the training thread); the batches
            are the same either way.
        prefetch: Steps decoded ahead of training (and chunks ahead of evaluation).
        weights: A local file of pretrained weights for the ResNet-18 trunk (a torchvision
            ``resnet18`` state dict, ``fc.*`` ignored; see :mod:`fm_optuna.datasets._weights`);
            default: random initialisation.

    Example:
        >>> cpu = torch.device("cpu")
        >>> problem = build(target="sketch", seed=0, device=cpu, data_dir="data/domainnet",
        ...                 image_size=32, limit=500)  # doctest: +SKIP
    """
    if target not in TARGETS:
        raise one_of("target", target, TARGETS)
    if data_dir is None:
        raise ConfigError(
            "Parameter `data_dir` is required by the domainnet benchmark (nothing is "
            "downloaded): a folder with the DomainNet layout: <domain>/<class>/<image>.jpg, "
            "image_list/<domain>_train.txt and image_list/<domain>_test.txt for each domain used."
        )
    if not isinstance(data_dir, str | os.PathLike):
        raise invalid("data_dir", data_dir, "a folder path")
    chosen = parse_domains(domains)
    if target not in chosen:
        raise invalid("target", target, "one of the `domains` in use: " + ", ".join(chosen))
    check_positive(batch_size=batch_size, image_size=image_size)
    if batch_size < 2:
        # BatchNorm cannot normalise one image whose last feature map is 1 × 1.
        raise invalid("batch_size", batch_size, "at least 2 (BatchNorm needs two images)")
    if image_size < MIN_IMAGE_SIZE:
        raise invalid("image_size", image_size, f"at least {MIN_IMAGE_SIZE} (ResNet-18 input)")
    if limit is not None:
        check_positive(limit=limit)
    if val_size is not None and val_fraction is not None:
        raise invalid("val_fraction", val_fraction, "unset when `val_size` is given")
    if val_size is not None:
        check_positive(val_size=val_size)
    fraction = DEFAULT_VAL_FRACTION if val_fraction is None else val_fraction
    check_fraction(val_fraction=fraction, below=1)
    check_non_negative(data_seed=data_seed)
    for name, flag in (("augment", augment), ("cache_val", cache_val)):
        if not isinstance(flag, bool):
            raise invalid(name, flag, "true or false")
    check_non_negative(workers=workers, prefetch=prefetch)
    if weights is not None and not isinstance(weights, str | os.PathLike):
        raise invalid("weights", weights, "the path of a file of pretrained weights")
    return DomainNetProblem(
        target=target,
        seed=seed,
        device=device,
        data_dir=Path(data_dir).expanduser(),
        domains=chosen,
        batch_size=batch_size,
        image_size=image_size,
        limit=limit,
        val_size=val_size,
        val_fraction=float(fraction),
        data_seed=data_seed,
        augment=augment,
        cache_val=cache_val,
        workers=workers,
        prefetch=prefetch,
        weights=None if weights is None else str(weights),
    )
