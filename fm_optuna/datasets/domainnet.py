"""DomainNet from a local folder (image folders + lists), and a ResNet-18 with a head per domain.

Layout (the one the paper's code reads, after Peng et al.'s release)::

    root/<domain>/<class>/<name>.jpg
    root/image_list/<domain>_train.txt   lines "<domain>/<class>/<name>.jpg <label>"
    root/image_list/<domain>_val.txt
    root/image_list/<domain>_test.txt

Paths in the lists are relative to ``root``; labels are ``0 .. 344`` (:data:`NUM_CLASSES`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from fm_optuna.datasets._folder import folder_error, require
from fm_optuna.errors import ConfigError, one_of

__all__ = ["DOMAINS", "NUM_CLASSES", "SPLITS", "DomainNet", "DomainNetNet", "default_transform"]

DOMAINS: tuple[str, ...] = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")
SPLITS: tuple[str, ...] = ("train", "val", "test")
NUM_CLASSES = 345


def default_transform(size: int = 224) -> Callable[[object], torch.Tensor]:
    """Resize to ``size × size``, to tensor, ImageNet normalisation."""
    from torchvision import transforms

    return transforms.Compose(
        [
            transforms.Resize((size, size)),
            transforms.ToTensor(),
            transforms.Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
        ]
    )


class DomainNet(Dataset):
    """One domain's split: ``(image tensor, label)`` per item, read lazily with PIL.

    Args:
        root: The DomainNet folder.
        domain: One of :data:`DOMAINS`.
        split: ``"train"``, ``"val"`` or ``"test"``.
        transform: PIL image → tensor (default: :func:`default_transform`).

    Raises:
        ConfigError: When the list or an image it names is missing, or a line is malformed.
    """

    def __init__(
        self,
        root: str | Path,
        domain: str,
        split: str = "train",
        transform: Callable[[object], torch.Tensor] | None = None,
    ) -> None:
        if domain not in DOMAINS:
            raise one_of("domain", domain, DOMAINS)
        if split not in SPLITS:
            raise one_of("split", split, SPLITS)
        listing = f"image_list/{domain}_{split}.txt"
        expected = [listing, f"{domain}/<class>/<image>.jpg (as listed)"]
        self.root = require("DomainNet", root, [listing, domain], layout=expected)
        self.samples: list[tuple[Path, int]] = []
        lines = (self.root / listing).read_text().splitlines()
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2 or not parts[1].isdigit() or int(parts[1]) >= NUM_CLASSES:
                raise ConfigError(
                    f"{self.root / listing}:{number}: expected `<path> <label in 0..344>`, "
                    f"found `{line.strip()}`."
                )
            self.samples.append((self.root / parts[0], int(parts[1])))
        missing = [
            str(path.relative_to(self.root)) for path, _ in self.samples if not path.is_file()
        ]
        if missing:
            raise folder_error("DomainNet", self.root, expected, missing)
        self.transform = transform or default_transform()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        path, label = self.samples[index]
        with Image.open(path) as image:
            return self.transform(image.convert("RGB")), label


class DomainNetNet(nn.Module):
    """torchvision's ResNet-18 (random init: nothing is downloaded) with one linear head per domain.

    Args:
        domains: Head names, e.g. :data:`DOMAINS`.
        num_classes: Classes per head.
    """

    def __init__(self, domains: Sequence[str] = DOMAINS, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        from torchvision.models import resnet18

        self.trunk = resnet18(weights=None)
        features = self.trunk.fc.in_features
        self.trunk.fc = nn.Identity()
        self.heads = nn.ModuleDict({d: nn.Linear(features, num_classes) for d in domains})

    def forward(self, images: torch.Tensor, domain: str) -> torch.Tensor:
        return self.heads[domain](self.trunk(images))
