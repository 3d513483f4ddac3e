"""NYUv2 in MTAN's preprocessed layout, and a small DeepLab-style multi-task network for it.

Layout (Liu et al.'s MTAN release, used by LibMTL and the paper's scene-understanding
experiment)::

    root/train/image/0.npy   float [288, 384, 3]  RGB in [0, 1]
    root/train/label/0.npy   float [288, 384]     13 classes, -1 where unlabelled
    root/train/depth/0.npy   float [288, 384, 1]  metres, 0 where missing
    root/train/normal/0.npy  float [288, 384, 3]  unit surface normals, 0 where missing
    root/val/...             the same for the 654 test images

Indices run ``0 .. n-1`` in every folder of a split. The paper's three tasks are segmentation,
depth and surface normals (:data:`TASKS`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset

from fm_optuna.datasets._folder import folder_error, require
from fm_optuna.errors import one_of

__all__ = ["NUM_CLASSES", "SPLITS", "TASKS", "NYUv2", "NYUv2Net", "nyuv2_losses"]

SPLITS: tuple[str, ...] = ("train", "val")
FOLDERS: tuple[str, ...] = ("image", "label", "depth", "normal")
TASKS: tuple[str, ...] = ("segmentation", "depth", "normal")
NUM_CLASSES = 13
OUTPUT_CHANNELS = {"segmentation": NUM_CLASSES, "depth": 1, "normal": 3}
_INDEX = re.compile(r"^(\d+)\.npy$")


def _expected(split: str) -> list[str]:
    return [f"{split}/{folder}/{{i}}.npy" for folder in FOLDERS]


class NYUv2(Dataset):
    """One split of NYUv2: ``(image [3, H, W], {"segmentation", "depth", "normal"})`` per item.

    Segmentation is ``long [H, W]`` with -1 for unlabelled pixels; depth ``[1, H, W]``; normals
    ``[3, H, W]``.

    Args:
        root: The folder holding ``train/`` and ``val/``.
        split: ``"train"`` or ``"val"`` (MTAN's test images).

    Raises:
        ConfigError: When a folder is missing or the four folders do not hold the same indices.
    """

    def __init__(self, root: str | Path, split: str = "train") -> None:
        if split not in SPLITS:
            raise one_of("split", split, SPLITS)
        expected = _expected(split)
        self.root = require(
            "NYUv2 (MTAN .npy)", root, [f"{split}/{f}" for f in FOLDERS], layout=expected
        )
        self.split = split
        present = {
            folder: {
                int(match.group(1))
                for path in (self.root / split / folder).iterdir()
                if (match := _INDEX.match(path.name))
            }
            for folder in FOLDERS
        }
        indices = set().union(*present.values())
        if not indices:
            raise folder_error("NYUv2 (MTAN .npy)", self.root, expected, [f"{split}/image/0.npy"])
        wanted = range(max(indices) + 1)
        missing = [
            f"{split}/{folder}/{i}.npy"
            for i in wanted
            for folder in FOLDERS
            if i not in present[folder]
        ]
        if missing:
            raise folder_error("NYUv2 (MTAN .npy)", self.root, expected, missing)
        self.size = len(wanted)

    def __len__(self) -> int:
        return self.size

    def _load(self, folder: str, index: int) -> torch.Tensor:
        array = np.load(self.root / self.split / folder / f"{index}.npy")
        return torch.from_numpy(np.ascontiguousarray(array))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if not 0 <= index < self.size:
            raise IndexError(index)
        image = self._load("image", index).float().permute(2, 0, 1)
        label = self._load("label", index).round().long()
        depth = self._load("depth", index).float().permute(2, 0, 1)
        normal = self._load("normal", index).float().permute(2, 0, 1)
        return image, {"segmentation": label, "depth": depth, "normal": normal}


class _AtrousHead(nn.Sequential):
    """A DeepLab-style head: parallel atrous convolutions, fused, then a 1 × 1 classifier."""

    def __init__(self, in_channels: int, out_channels: int, width: int = 64) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(in_channels, width, 3, padding=rate, dilation=rate, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(),
            )
            for rate in (1, 2, 4)
        )
        self.fuse = nn.Sequential(
            nn.Conv2d(3 * width, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.classifier = nn.Conv2d(width, out_channels, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        fused = self.fuse(torch.cat([branch(features) for branch in self.branches], dim=1))
        return self.classifier(fused)


class NYUv2Net(nn.Module):
    """A ResNet-18 trunk (torchvision, random init) to stride 16 and one atrous head per task.

    A deliberately small cousin of the DeepLab-v3 ResNet-50 in the paper; outputs are upsampled to
    the input size, and normals are L2-normalised per pixel.
    """

    def __init__(self, tasks: tuple[str, ...] = TASKS) -> None:
        super().__init__()
        from torchvision.models import resnet18

        for task in tasks:
            if task not in OUTPUT_CHANNELS:
                raise one_of("task", task, OUTPUT_CHANNELS)
        backbone = resnet18(weights=None)
        self.trunk = nn.Sequential(
            backbone.conv1,
            backbone.bn1,
            backbone.relu,
            backbone.maxpool,
            backbone.layer1,
            backbone.layer2,
            backbone.layer3,
        )
        self.heads = nn.ModuleDict({t: _AtrousHead(256, OUTPUT_CHANNELS[t]) for t in tasks})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.trunk(images)
        outputs = {}
        for task, head in self.heads.items():
            out = F.interpolate(
                head(features), size=images.shape[-2:], mode="bilinear", align_corners=False
            )
            outputs[task] = F.normalize(out, dim=1) if task == "normal" else out
        return outputs


def nyuv2_losses(
    outputs: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """LibMTL's NYUv2 losses: cross-entropy (unlabelled ignored), L1 depth and 1 − cosine normals
    over the pixels where the ground truth exists."""
    losses: dict[str, torch.Tensor] = {}
    if "segmentation" in outputs:
        losses["segmentation"] = F.cross_entropy(
            outputs["segmentation"], targets["segmentation"], ignore_index=-1
        )
    if "depth" in outputs:
        valid = targets["depth"] != 0
        losses["depth"] = (outputs["depth"] - targets["depth"]).abs()[valid].mean()
    if "normal" in outputs:
        valid = targets["normal"].abs().sum(dim=1) != 0
        cosine = (outputs["normal"] * targets["normal"]).sum(dim=1)
        losses["normal"] = (1 - cosine[valid]).mean()
    return losses
