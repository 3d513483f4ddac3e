"""AliExpress (multi-country CTR/CTCVR) from a local folder, in MTReclib's processed layout.

Layout (what MTReclib's ``preprocess.py`` writes, and what the paper's experiment reads)::

    root/AliExpress_<country>/train.csv
    root/AliExpress_<country>/test.csv

with the header ``search_id, categorical_1 .. categorical_16, numerical_1 .. numerical_63, click,
conversion``. Categorical values are integer codes; ``conversion`` implies ``click``. Columns are
found by name, so the counts may differ (the test fixtures use fewer).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from fm_optuna.datasets._folder import require
from fm_optuna.errors import ConfigError, one_of

__all__ = ["COUNTRIES", "CTRTable", "field_dims", "load_aliexpress"]

COUNTRIES: tuple[str, ...] = ("ES", "FR", "NL", "US")
SPLITS: tuple[str, ...] = ("train", "test")
HEADER = "search_id, categorical_1.., numerical_1.., click, conversion"


@dataclass(frozen=True)
class CTRTable:
    """One CSV as tensors: ``categorical`` long ``[n, fields]``, ``numerical`` float
    ``[n, features]``, ``click`` and ``conversion`` float ``[n]``."""

    categorical: torch.Tensor
    numerical: torch.Tensor
    click: torch.Tensor
    conversion: torch.Tensor

    def __len__(self) -> int:
        return len(self.click)


def load_aliexpress(
    root: str | Path, country: str, split: str = "train", *, rows: int | None = None
) -> CTRTable:
    """Read ``root/AliExpress_<country>/<split>.csv``, or only its first ``rows`` rows (the full
    files have millions; a CPU try reads a head).

    Raises:
        ConfigError: When the file is missing or lacks the expected columns.

    Example:
        >>> table = load_aliexpress("/data/aliexpress", "NL", "test")  # doctest: +SKIP
    """
    import pandas as pd

    if country not in COUNTRIES:
        raise one_of("country", country, COUNTRIES)
    if split not in SPLITS:
        raise one_of("split", split, SPLITS)
    relative = f"AliExpress_{country}/{split}.csv"
    layout = [f"AliExpress_<country>/{s}.csv" for s in SPLITS]
    path = require("AliExpress", root, [relative], layout=layout) / relative
    frame = pd.read_csv(path, nrows=rows)
    categorical = [c for c in frame.columns if str(c).startswith("categorical_")]
    numerical = [c for c in frame.columns if str(c).startswith("numerical_")]
    if not categorical or "click" not in frame.columns or "conversion" not in frame.columns:
        raise ConfigError(
            f"{path}: expected the columns {HEADER}; found {', '.join(map(str, frame.columns))}."
        )
    return CTRTable(
        categorical=torch.from_numpy(frame[categorical].to_numpy(dtype="int64", copy=True)),
        numerical=torch.from_numpy(frame[numerical].to_numpy(dtype="float32", copy=True)),
        click=torch.from_numpy(frame["click"].to_numpy(dtype="float32", copy=True)),
        conversion=torch.from_numpy(frame["conversion"].to_numpy(dtype="float32", copy=True)),
    )


def field_dims(*tables: CTRTable) -> list[int]:
    """Embedding sizes per categorical field: the largest code in any table, plus one."""
    largest = torch.stack([table.categorical.max(dim=0).values for table in tables])
    return [int(value) + 1 for value in largest.max(dim=0).values]
