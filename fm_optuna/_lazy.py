"""Package faces that import their private modules on first use.

``import fm_optuna`` (and ``fm-optuna --help``) should not pay for torch, Optuna or MLflow, so a
package's ``__init__`` names where each public name lives and loads that module when the name is
first read.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_face(
    package: str, where: Mapping[str, str], public: list[str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The module-level ``__getattr__`` and ``__dir__`` of ``package``.

    Args:
        package: The package's ``__name__``.
        where: Public name → the module (relative to ``package``) that defines it.
        public: The package's ``__all__``.
    """

    def getattr_(name: str) -> Any:
        if name in where:
            return getattr(importlib.import_module(f"{package}.{where[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def dir_() -> list[str]:
        return sorted({*public, *where})

    return getattr_, dir_
