"""Checking a data set's folder before anything reads it.

Every loader here validates its folder first and raises one :class:`ConfigError` that names what
it expected, so a wrong path is a one-line message rather than a traceback from deep inside numpy,
PIL or PyG (and never a download attempt).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fm_optuna.errors import ConfigError

# Enough missing entries to see the pattern without flooding the terminal.
SHOWN = 5


def folder_error(
    dataset: str, root: Path, expected: Sequence[str], missing: Sequence[str]
) -> ConfigError:
    """The one error every loader raises: what was expected under ``root`` and what is missing.

    It names ``data_dir``, the option through which users give the folder (CLI ``--data-dir``,
    ``[problem] data_dir`` in a study file), rather than the loaders' argument ``root``.
    """
    shown = ", ".join(missing[:SHOWN])
    if len(missing) > SHOWN:
        shown += f", … ({len(missing)} in all)"
    return ConfigError(
        f"Parameter `data_dir` should be a folder with the {dataset} layout: "
        f"{'; '.join(expected)}. Found `data_dir = {root}` (missing: {shown})."
    )


def require(
    dataset: str, root: str | Path, expected: Sequence[str], *, layout: Sequence[str] = ()
) -> Path:
    """Return ``root`` as a path if every relative path in ``expected`` exists under it.

    Args:
        dataset: The data set's name, for the message.
        root: The folder given by the user.
        expected: Paths relative to ``root`` that must exist (files or folders).
        layout: How to describe the layout in the message (default: ``expected``).

    Raises:
        ConfigError: Listing the expected layout and the missing entries.

    Example:
        >>> require("QM9", "/nowhere", ["raw/gdb9.sdf"])  # doctest: +SKIP
        Traceback (most recent call last):
        fm_optuna.errors.ConfigError: Parameter `data_dir` should be a folder with the QM9 ...
    """
    path = Path(root).expanduser()
    described = list(layout) or list(expected)
    if not path.is_dir():
        raise folder_error(dataset, path, described, [str(path)])
    missing = [entry for entry in expected if not (path / entry).exists()]
    if missing:
        raise folder_error(dataset, path, described, missing)
    return path
