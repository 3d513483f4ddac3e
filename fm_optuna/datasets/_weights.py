"""Pretrained backbone weights from a local file (nothing is ever downloaded).

The folder benchmarks' models put a torchvision ResNet-18 (DomainNet: the whole of it up to the
pooled features; NYUv2: up to ``layer3``) under ``model.trunk``. The ``weights`` option of those
benchmarks names a file that ``torch.load`` reads (``weights_only``: tensors, no code) holding
one of:

- a **torchvision ResNet-18 state dict**: ``torchvision.models.resnet18().state_dict()`` saved
  with ``torch.save``, or the ``resnet18-*.pth`` file torchvision itself caches; its keys are
  ``conv1.weight``, ``bn1.*``, ``layer1.*`` … ``layer4.*`` and ``fc.*``;
- a **state dict of the benchmark's own model** (keys ``trunk.*`` and ``heads.*``, e.g. a model
  trained here before);
- either of them under a ``"state_dict"`` or ``"model"`` key (a training checkpoint).

Only the trunk is loaded: the classifier ``fc.*``, the task heads ``heads.*`` and, for NYUv2's
shorter trunk, ``layer4.*`` are ignored; the heads stay randomly initialised from the run's seed.
Every other trunk tensor must be in the file with the trunk's shape (BatchNorm's
``num_batches_tracked`` counters may be absent, as in older torchvision files). The file is read
and checked when the problem is built, before anything trains: a missing file, one that is not a
state dict, a missing or unexpected key or a wrong shape is one :class:`ConfigError` line naming
``weights``, the path and the first offending key.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from fm_optuna.errors import ConfigError

__all__ = ["load_trunk_weights"]

#: Keys of the wrapped forms (training checkpoints) whose value is the state dict.
_WRAPPERS = ("state_dict", "model")
_COUNTER = "num_batches_tracked"

#: ``key in the file -> trunk key``, or ``None`` for a key that is ignored on purpose.
Rename = Callable[[str], str | None]


def _shape(tensor: torch.Tensor) -> str:
    return "[" + ", ".join(str(side) for side in tensor.shape) + "]"


def load_trunk_weights(
    path: str | os.PathLike[str],
    trunk: Mapping[str, torch.Tensor],
    rename: Rename,
    what: str,
    *,
    source_key: Callable[[str], str] = str,
) -> dict[str, torch.Tensor]:
    """The trunk's tensors read from the file at ``path``, renamed to the trunk's keys.

    Args:
        path: The ``weights`` option.
        trunk: The trunk's state dict (any device, ``meta`` included: only shapes are read).
        rename: Maps a key of the file to the trunk's key, or ``None`` to ignore it; a key
            that maps to none of the trunk's is unexpected.
        what: What the file should hold, for the message (e.g. "a ResNet-18 state dict ...").
        source_key: The trunk's key as the file should name it (torchvision's name), for the
            message about a missing key.

    Raises:
        ConfigError: One line naming ``weights``, the path and the first problem found.
    """
    file = Path(path).expanduser()

    def error(detail: str) -> ConfigError:
        return ConfigError(
            f"Parameter `weights` should be {what}. Found `weights = {path}` ({detail})."
        )

    if not file.is_file():
        raise error("no such file")
    try:
        loaded = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and torch errors alike: not a state dict file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise error(f"torch.load could not read it: {first}") from None
    for wrapper in _WRAPPERS:
        if isinstance(loaded, Mapping) and isinstance(loaded.get(wrapper), Mapping):
            loaded = loaded[wrapper]
            break
    if not isinstance(loaded, Mapping) or not all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in loaded.items()
    ):
        raise error(f"it holds a {type(loaded).__name__}, not a state dict of tensors")
    mapped: dict[str, torch.Tensor] = {}
    for key, value in loaded.items():
        name = rename(key)
        if name is None:
            continue
        if name not in trunk:
            raise error(f"unexpected key `{key}`")
        if value.shape != trunk[name].shape:
            raise error(
                f"`{key}` has shape {_shape(value)} where the model's `{name}` has "
                f"{_shape(trunk[name])}"
            )
        mapped[name] = value
    missing = [key for key in trunk if key not in mapped and not key.endswith(_COUNTER)]
    if missing:
        more = f", and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise error(f"no `{source_key(missing[0])}`{more}")
    return mapped
