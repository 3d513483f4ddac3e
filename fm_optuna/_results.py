"""Result files of the comparison commands: a table as CSV beside the whole result as JSON.

Each file is written to a temporary name and renamed into place, so a full disk or a signal
leaves the previous file (or none), never half of one. The JSON is strict: NaN and ±inf become
``null`` (a failed run's score), which every JSON reader accepts.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["finite", "save_table", "write_atomically"]


def finite(value: Any) -> Any:
    """``value`` with NaN and ±inf replaced by ``None`` (strict JSON).

    Example:
        >>> finite({"score": float("nan"), "curve": [1.0, float("inf")]})
        {'score': None, 'curve': [1.0, None]}
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [finite(item) for item in value]
    return value


def write_atomically(path: Path, text: str) -> None:
    """``text`` into ``path`` through a temporary file in the same folder and a rename."""
    temporary = path.with_name(f".{path.name}.partial")
    try:
        temporary.write_text(text)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def save_table(
    directory: Path, stem: str, rows: Sequence[Mapping[str, Any]], result: Mapping[str, Any]
) -> dict[str, Path]:
    """``<stem>.csv`` (``rows``, every key a column) and ``<stem>.json`` (``result``) in
    ``directory``, created if missing; their paths by kind."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = {"csv": directory / f"{stem}.csv", "json": directory / f"{stem}.json"}
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=list(dict.fromkeys(k for row in rows for k in row)))
    writer.writeheader()
    writer.writerows(rows)
    text = json.dumps(finite(result), indent=2, default=str)  # before writing either file
    write_atomically(paths["csv"], table.getvalue())
    write_atomically(paths["json"], text)
    return paths
