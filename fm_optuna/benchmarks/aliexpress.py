"""AliExpress: click (CTR) and click-and-purchase (CTCVR) tasks in four countries, from a folder.

The paper's recommendation experiment. The data are read from a local folder (``data_dir``) in
the layout MTReclib's ``preprocess.py`` writes (see :mod:`fm_optuna.datasets.aliexpress`)::

    data_dir/AliExpress_<country>/train.csv
    data_dir/AliExpress_<country>/test.csv

for the countries ``ES``, ``FR``, ``NL`` and ``US``; ``countries`` selects a subset when only some
are at hand (the target's country must be among them). Nothing is ever downloaded.

- *Tasks*: ``<COUNTRY>_ctr`` (label ``click``) and ``<COUNTRY>_ctcvr`` (label ``click AND
  conversion``: a purchase after a click, predicted on every impression, as in ESMM and MTReclib)
  for each selected country: eight tasks with all four countries. Country codes stay upper-case as
  in the folder names; the task kinds are the paper's. :data:`TARGETS` lists all eight whatever
  the data at hand; the default target is ``NL_ctcvr``.
- *Splits*: the published layout has no validation split, so one is carved from each country's
  training rows by a permutation seeded with ``data_seed`` and the country (``val_fraction`` of
  them, 10% by default); the rest train. Test is ``test.csv``. A country's split does not depend
  on which other countries are selected. ``limit`` keeps only the first ``limit`` rows of each
  CSV (validation then comes out of the first ``limit`` training rows), so a CPU can try the
  benchmark without parsing the full files (tens of millions of rows per country).
- *Metrics*: the AUC (higher is better) and the mean binary cross-entropy as ``loss``.
- *Model*: :class:`~fm_optuna.datasets.ctr.SharedBottom` with MTReclib's sizes (embeddings of
  ``embed_dim`` = 128 per categorical field plus one for the numerical features, a shared
  512-256 bottom, a 128-64 tower per task, without MTReclib's dropout); ``model="esmm"`` makes
  each CTCVR tower predict p(click) × p(conversion | click) with its country's CTR tower.
  Embedding sizes come from the largest code of every loaded table, train *and* test, so no
  validation or test code can index past its table.

Each country's tasks share one batch of ``batch_size`` of that country's training rows per step;
different countries draw their own batches (the countries are separate data, like domains).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from fm_optuna.benchmarks._images import check_fraction, check_non_negative, check_positive
from fm_optuna.benchmarks._scenarios import MODELS, Rows, ScenarioCTRProblem
from fm_optuna.datasets._folder import require
from fm_optuna.datasets.aliexpress import COUNTRIES, SPLITS, CTRTable, field_dims, load_aliexpress
from fm_optuna.errors import ConfigError, invalid, one_of

__all__ = [
    "COUNTRIES",
    "DEFAULT_TARGET",
    "KINDS",
    "MODELS",
    "TARGETS",
    "AliExpressProblem",
    "build",
    "read_table",
]

KINDS: tuple[str, str] = ("ctr", "ctcvr")
TARGETS: tuple[str, ...] = tuple(f"{country}_{kind}" for country in COUNTRIES for kind in KINDS)
DEFAULT_TARGET = "NL_ctcvr"
# MTReclib's sizes for every model it trains on AliExpress (main.py's get_model).
BOTTOM: tuple[int, ...] = (512, 256)
TOWER: tuple[int, ...] = (128, 64)
LAYOUT = "AliExpress_<country>/train.csv; AliExpress_<country>/test.csv"


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def read_table(root: Path, country: str, split: str, limit: int | None = None) -> CTRTable:
    """One country's CSV through :func:`load_aliexpress`, or only its first ``limit`` rows."""
    return load_aliexpress(root, country, split, rows=limit)


def _check_folder(data_dir: str, countries: Sequence[str]) -> Path:
    """``data_dir`` as a path once every selected country's files exist; else one ConfigError.

    The folder check is the loader's (:func:`~fm_optuna.datasets._folder.require`), run for all
    selected countries at once so the message lists everything missing; when the folder exists
    but lacks some countries, the message also names the way out (``countries``).
    """
    expected = [f"AliExpress_{country}/{split}.csv" for country in countries for split in SPLITS]
    try:
        return require("AliExpress", data_dir, expected, layout=[LAYOUT])
    except ConfigError as error:
        if not Path(data_dir).expanduser().is_dir():
            raise
        raise ConfigError(
            f"{error} Set `countries` to the countries you have (selected: {', '.join(countries)})."
        ) from None


def _check_tables(tables: dict[tuple[str, str], CTRTable], root: Path) -> None:
    """Every table must have the same columns, codes ≥ 0 and 0/1 labels, for one shared model."""
    (first_key, first), *_ = tables.items()
    for (country, split), table in tables.items():
        where = root / f"AliExpress_{country}" / f"{split}.csv"
        if table.categorical.shape[1] != first.categorical.shape[1] or (
            table.numerical.shape[1] != first.numerical.shape[1]
        ):
            other = root / f"AliExpress_{first_key[0]}" / f"{first_key[1]}.csv"
            raise ConfigError(
                f"{where}: expected the same categorical and numerical columns as {other} "
                f"({first.categorical.shape[1]} and {first.numerical.shape[1]}); found "
                f"{table.categorical.shape[1]} and {table.numerical.shape[1]}."
            )
        if len(table) == 0:
            raise ConfigError(f"{where}: expected at least one row; found none.")
        if bool((table.categorical < 0).any()):
            raise ConfigError(f"{where}: expected categorical codes ≥ 0; found negative ones.")
        for column in ("click", "conversion"):
            labels = getattr(table, column)
            if not bool(((labels == 0) | (labels == 1)).all()):
                raise ConfigError(f"{where}: expected `{column}` values 0 or 1; found others.")


def _validation_rows(n: int, country: str, val_fraction: float, data_seed: int) -> np.ndarray:
    """The training rows held out for validation: seeded by ``data_seed`` and the country, so a
    country's split is the same whichever other countries are selected."""
    order = np.random.default_rng([data_seed, COUNTRIES.index(country)]).permutation(n)
    return np.sort(order[: round(n * val_fraction)])


def _labelled(table: CTRTable, rows: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Features and both tasks' labels of ``rows`` (all rows when ``None``)."""
    pick = slice(None) if rows is None else rows
    click, conversion = table.click[pick], table.conversion[pick]
    return {
        "categorical": table.categorical[pick],
        "numerical": table.numerical[pick],
        "ctr": click,
        # A purchase counts only after a click (the CSVs already imply it; enforce it anyway).
        "ctcvr": click * conversion,
    }


def _country_of(task: str) -> tuple[str, str]:
    country, _, kind = task.rpartition("_")
    return country, kind


# --------------------------------------------------------------------------------------------
# The problem
# --------------------------------------------------------------------------------------------


class AliExpressProblem(ScenarioCTRProblem):
    """CTR and CTCVR tasks per country on a shared-bottom (or ESMM) model.

    Use :func:`build` (or ``build_problem("aliexpress", ...)``) rather than the constructor.
    """

    name = "aliexpress"
    kinds = KINDS
    bottom, tower = BOTTOM, TOWER

    def __init__(
        self,
        *,
        target: str,
        seed: int,
        device: torch.device,
        root: Path,
        countries: tuple[str, ...],
        limit: int | None,
        batch_size: int,
        val_fraction: float,
        data_seed: int,
        model: str,
        embed_dim: int,
    ) -> None:
        self.target = target
        self.seed = seed
        self.device = device
        self.scenarios = countries
        self.batch_size = batch_size
        self.model_kind = model
        self.embed_dim = embed_dim
        self.options: dict[str, object] = {
            "data_dir": str(root),
            "countries": ",".join(countries),
            "limit": "all" if limit is None else limit,
            "val_fraction": val_fraction,
            "data_seed": data_seed,
            "model": model,
            "embed_dim": embed_dim,
        }
        self._make_tasks()

        tables = {
            (country, split): read_table(root, country, split, limit)
            for country in countries
            for split in SPLITS
        }
        _check_tables(tables, root)
        self.field_dims = field_dims(*tables.values())
        self.numerical = int(tables[(countries[0], "train")].numerical.shape[1])

        self._rows: Rows = {
            "train": {},
            "val": {},
            "test": {},
        }
        for country in countries:
            train = tables[(country, "train")]
            held = torch.from_numpy(_validation_rows(len(train), country, val_fraction, data_seed))
            keep = torch.ones(len(train), dtype=torch.bool)
            keep[held] = False
            if len(held) == 0 or not bool(keep.any()):
                raise invalid(
                    "val_fraction",
                    val_fraction,
                    f"a share that leaves rows for both training and validation in {country} "
                    f"({len(train)} training rows; raise `limit` or change `val_fraction`)",
                )
            splits = {
                "train": _labelled(train, torch.nonzero(keep).squeeze(1)),
                "val": _labelled(train, held),
                "test": _labelled(tables[(country, "test")]),
            }
            for split, rows in splits.items():
                self._rows[split][country] = {key: value.to(device) for key, value in rows.items()}
        self._check_target_labels()

    def _check_target_labels(self) -> None:
        """The target's validation AUC selects Λ: it must exist (both classes present).

        CTCVR positives are rare (well under 1% of impressions), so a small ``limit`` easily
        leaves none; say so now rather than merge on NaN scores.
        """
        country, kind = _country_of(self.target)
        labels = self._rows["val"][country][kind]
        positives = int(labels.sum())
        if positives == 0 or positives == len(labels):
            raise ConfigError(
                f"The validation rows of {country} ({len(labels)}) hold only one class of the "
                f"target's `{kind}` label, so its AUC is undefined: raise `limit` or "
                "`val_fraction`, or choose another target."
            )

    @property
    def countries(self) -> tuple[str, ...]:
        """The selected countries (the scenarios), in :data:`COUNTRIES` order."""
        return self.scenarios


def _countries(value: Sequence[str] | str | None, target: str) -> tuple[str, ...]:
    """The selected countries in :data:`COUNTRIES` order (task order must not depend on how the
    user listed them); a comma-separated string is accepted for the command line's sake."""
    allowed = "a non-empty list of distinct countries among " + ", ".join(COUNTRIES)
    if value is None:
        chosen: list[str] = list(COUNTRIES)
    elif isinstance(value, str):
        chosen = [part.strip() for part in value.split(",") if part.strip()]
    elif isinstance(value, Sequence) and all(isinstance(part, str) for part in value):
        chosen = list(value)
    else:
        raise invalid("countries", value, allowed)
    if not chosen or len(set(chosen)) != len(chosen) or any(c not in COUNTRIES for c in chosen):
        raise invalid("countries", value, allowed)
    country = _country_of(target)[0]
    if country not in chosen:
        raise invalid("countries", value, f"a list that includes the target's country {country}")
    return tuple(c for c in COUNTRIES if c in chosen)


def build(
    *,
    target: str,
    seed: int,
    device: torch.device,
    data_dir: str | None = None,
    countries: Sequence[str] | str | None = None,
    limit: int | None = None,
    batch_size: int = 2048,
    val_fraction: float = 0.1,
    data_seed: int = 0,
    model: str = "shared_bottom",
    embed_dim: int = 128,
) -> AliExpressProblem:
    """Build the AliExpress problem; bad options raise :class:`~fm_optuna.errors.ConfigError`.

    Args:
        target: One of :data:`TARGETS`, e.g. ``"NL_ctcvr"``.
        seed: The training seed (the data depend on ``data_seed`` only).
        device: Where the rows live and batches are drawn.
        data_dir: The folder holding ``AliExpress_<country>/{train,test}.csv`` (required).
        countries: The countries to load (default: all of :data:`COUNTRIES`); must include the
            target's. A list, or a comma-separated string.
        limit: Read only the first ``limit`` rows of each CSV (``None``: all of them).
        batch_size: Rows per country per step (MTReclib: 2048).
        val_fraction: Share of each country's training rows held out for validation.
        data_seed: Seed of the validation split.
        model: ``"shared_bottom"`` or ``"esmm"``.
        embed_dim: Embedding size per categorical field (MTReclib: 128).

    Example:
        >>> cpu = torch.device("cpu")
        >>> problem = build(target="NL_ctcvr", seed=0, device=cpu, data_dir="data/aliexpress",
        ...                 countries=["NL", "US"], limit=20_000)  # doctest: +SKIP
    """
    if target not in TARGETS:
        raise one_of("target", target, TARGETS)
    if data_dir is None:
        raise ConfigError(
            "Parameter `data_dir` is required by the aliexpress benchmark: a folder with "
            f"MTReclib's AliExpress layout ({LAYOUT}) for the countries "
            f"{', '.join(COUNTRIES)} (or those listed in `countries`). Found `data_dir = None`."
        )
    if model not in MODELS:
        raise one_of("model", model, MODELS)
    selected = _countries(countries, target)
    check_positive(batch_size=batch_size, embed_dim=embed_dim)
    if limit is not None:
        check_positive(limit=limit)
    check_non_negative(data_seed=data_seed)
    check_fraction(val_fraction=val_fraction, below=0.5)
    root = _check_folder(str(data_dir), selected)
    return AliExpressProblem(
        target=target,
        seed=seed,
        device=device,
        root=root,
        countries=selected,
        limit=limit,
        batch_size=batch_size,
        val_fraction=float(val_fraction),
        data_seed=data_seed,
        model=model,
        embed_dim=embed_dim,
    )
