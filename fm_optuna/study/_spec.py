"""Study specifications (``studies/*.toml``) parsed into typed, validated configuration.

The keys of ``[study]``, ``[training]`` and ``[search]``, their types, ranges and defaults are
those of the schema in :mod:`fm_optuna.config`; ``[problem]`` holds the problem's source and its
own options, ``[space]`` what the outer study searches. Every mistake is one
:class:`ConfigError` naming the file, the key and what is allowed, raised before anything is
created in any store.

Example:
    >>> spec = load_spec("studies/digits.toml")  # doctest: +SKIP
    >>> spec.study.name, spec.space.dt.low
    ('digits-uci', 50)
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fm_optuna.benchmarks import resolve
from fm_optuna.config import (
    DEFAULT_OPTUNA_STORAGE,
    OPTIMIZER_POLICIES,
    ForkMergeConfig,
    RuntimeOptions,
    SchemaEntry,
    StudyOptions,
    schema,
)
from fm_optuna.core._branches import check_keep
from fm_optuna.errors import ConfigError

if TYPE_CHECKING:
    from fm_optuna.problem._tasks import Problem

REQUIRED_TABLES = ("study", "problem")
TABLES = ("study", "problem", "training", "search", "space")
DEFAULT_BENCHMARK = "digits"
#: Kept for code written before the schema moved to :mod:`fm_optuna.config`.
StudySection = StudyOptions

__all__ = [
    "DEFAULT_OPTUNA_STORAGE",
    "StudySpec",
    "check_space_searches",
    "load_spec",
    "parse_space",
]


@dataclass(frozen=True)
class IntRange:
    low: int
    high: int
    log: bool = False


@dataclass(frozen=True)
class FloatRange:
    low: float
    high: float
    log: bool = False


@dataclass(frozen=True)
class ProblemSection:
    benchmark: str = DEFAULT_BENCHMARK  # a shipped benchmark, a plugin's name or module:factory
    target: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)  # benchmark-specific options


@dataclass(frozen=True)
class SpaceSection:
    dt: IntRange | None = None
    branches: IntRange | None = None
    lr: FloatRange | None = None
    optimizer_policy: tuple[str, ...] | None = None


class SectionView:
    """A study-file table's values by their keys (``spec.training.steps``), read-only."""

    def __init__(self, values: Mapping[str, Any]) -> None:
        self._values = dict(values)

    def __getattr__(self, key: str) -> Any:
        try:
            return self._values[key]
        except KeyError:
            raise AttributeError(key) from None

    def as_dict(self) -> dict[str, Any]:
        return dict(self._values)


@dataclass(frozen=True)
class StudySpec:
    """A study file (or the API call that stands for one), validated.

    Attributes:
        path: The file, or the call that built the spec (named in messages).
        study: The outer study's options.
        problem: The problem's source, target and options.
        base: The fixed ForkMerge configuration; an outer trial overrides what it searches.
        space: What the outer study searches.
        runtime: Device and threads.
    """

    path: Path | str
    study: StudyOptions
    problem: ProblemSection
    base: ForkMergeConfig
    space: SpaceSection
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)

    @property
    def seed(self) -> int:
        return self.base.seed

    @property
    def training(self) -> SectionView:
        return self._view("training")

    @property
    def search(self) -> SectionView:
        return self._view("search")

    def _view(self, section: str) -> SectionView:
        values = {}
        for entry in schema():
            if entry.option.section == section:
                owner = self.base if entry.owner is ForkMergeConfig else self.study
                if entry.owner is not RuntimeOptions:
                    values[entry.key] = getattr(owner, entry.name)
        return SectionView(values)

    def config(self, **overrides: Any) -> ForkMergeConfig:
        """The ForkMerge configuration for fixed values plus ``overrides`` (an outer trial's)."""
        return dataclasses.replace(self.base, **overrides)

    def build_problem(self, *, device: Any, target: str | None = None) -> Problem:
        """The ``[problem]`` built (``target`` overrides the spec's) and checked; a mistake is
        one line naming this file."""
        from fm_optuna.benchmarks import build_problem

        try:
            return build_problem(
                self.problem.benchmark,
                target=target or self.problem.target,
                seed=self.seed,
                device=device,
                **self.problem.options,
            )
        except ConfigError as error:
            raise ConfigError(f"{self.path}: {error}") from None


class _Reader:
    """Typed access to one TOML table that remembers the file and the key path for messages."""

    def __init__(self, path: Path | str, table: Mapping[str, Any], prefix: str) -> None:
        self.path, self.table, self.prefix = path, dict(table), prefix

    def error(self, key: str, value: Any, allowed: str) -> ConfigError:
        return ConfigError(
            f"{self.path}: Parameter `{self.prefix}{key}` should be {allowed}. "
            f"Found `{self.prefix}{key} = {value!r}` (a {type(value).__name__})."
        )

    def check_keys(self, allowed: Any) -> None:
        for key in self.table:
            if key not in allowed:
                raise ConfigError(
                    f"{self.path}: unknown key `{self.prefix}{key}`; allowed keys: "
                    + ", ".join(sorted(allowed))
                    + "."
                )

    def value(self, entry: SchemaEntry) -> Any:
        """The table's value of a schema option, checked against the schema."""
        value = self.table[entry.key]
        try:
            return entry.option.check(entry.key, value)
        except ConfigError:
            raise self.error(entry.key, value, entry.option.allowed(api=False)) from None

    def int(self, key: str, *, minimum: int) -> int | None:
        value = self.table.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.error(key, value, f"an integer ≥ {minimum}")
        return value

    def positive(self, key: str) -> float:
        value = self.table.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise self.error(key, value, "a positive number")
        return float(value)

    def bool(self, key: str) -> bool:
        value = self.table.get(key, False)
        if not isinstance(value, bool):
            raise self.error(key, value, "true or false")
        return value

    def sub(self, key: str) -> _Reader:
        value = self.table.get(key, {})
        if not isinstance(value, Mapping):
            raise self.error(key, value, "a table")
        return _Reader(self.path, value, f"{self.prefix}{key}.")


def _schema_values(root: _Reader) -> dict[type, dict[str, Any]]:
    """The values the file gives to schema options, by the dataclass that owns them; unknown
    keys and values the schema does not allow are one line naming the file and the key."""
    values: dict[type, dict[str, Any]] = {ForkMergeConfig: {}, StudyOptions: {}, RuntimeOptions: {}}
    for section in ("study", "training", "search"):
        table = root.sub(section)
        entries = {e.key: e for e in schema() if e.option.section == section}
        table.check_keys(entries)
        for key, entry in entries.items():
            if key in table.table:
                values[entry.owner][entry.name] = table.value(entry)
    return values


def _problem_section(p: _Reader) -> ProblemSection:
    """[problem]: the problem's source is resolved now (an unimportable module is one line);
    targets and options are checked against what the factory declares."""
    benchmark = p.table.get("benchmark", DEFAULT_BENCHMARK)
    if not isinstance(benchmark, str):
        raise p.error("benchmark", benchmark, "a string")
    try:
        source = resolve(benchmark)
    except ConfigError as error:
        raise ConfigError(f"{p.path}: {error}") from None
    target = p.table.get("target")
    known = source.targets  # None: the factory does not declare its targets
    if target is not None and (not isinstance(target, str) or (known and target not in known)):
        raise p.error("target", target, "one of " + ", ".join(known) if known else "a string")
    options = {k: v for k, v in p.table.items() if k not in ("benchmark", "target")}
    p.check_keys({"benchmark", "target", *source.options} if not source.any_option else p.table)
    return ProblemSection(benchmark, target, options)


def parse_space(table: Mapping[str, Any], *, steps: int, where: str = "space") -> SpaceSection:
    """The search space of an outer study from a mapping with the keys of a study file's
    ``[space]`` table, validated as the file would be.

    Example:
        >>> parse_space({"dt": {"low": 20, "high": 60}, "branches": {"low": 2, "high": 3}},
        ...             steps=120).dt
        IntRange(low=20, high=60, log=False)
    """
    return _space_section(_Reader(where, table, "space."), steps)


def _int_range(reader: _Reader, key: str, *, minimum: int) -> IntRange | None:
    if key not in reader.table:
        return None
    table = reader.sub(key)
    table.check_keys({"low", "high", "log"})
    low, high = table.int("low", minimum=minimum), table.int("high", minimum=minimum)
    if low is None or high is None:
        raise reader.error(key, reader.table[key], "a table with integer `low` and `high`")
    if low > high:
        raise reader.error(key, reader.table[key], "a non-empty range (low ≤ high)")
    return IntRange(low, high, table.bool("log"))


def _float_range(reader: _Reader, key: str) -> FloatRange | None:
    if key not in reader.table:
        return None
    table = reader.sub(key)
    table.check_keys({"low", "high", "log"})
    lr = FloatRange(table.positive("low"), table.positive("high"), table.bool("log"))
    if lr.low > lr.high:
        raise reader.error(key, reader.table[key], "a non-empty range (low ≤ high)")
    return lr


def _space_section(r: _Reader, steps: int) -> SpaceSection:
    r.check_keys({f.name for f in fields(SpaceSection)})
    dt = _int_range(r, "dt", minimum=1)
    if dt is not None and dt.high > steps:
        raise r.error("dt", r.table["dt"], f"a range within 1..training.steps ({steps})")
    policies = r.table.get("optimizer_policy")
    if policies is not None and (
        not isinstance(policies, list)
        or not policies
        or any(p not in OPTIMIZER_POLICIES for p in policies)
    ):
        raise r.error(
            "optimizer_policy", policies, "a non-empty list of " + ", ".join(OPTIMIZER_POLICIES)
        )
    return SpaceSection(
        dt,
        _int_range(r, "branches", minimum=2),
        _float_range(r, "lr"),
        tuple(policies) if policies else None,
    )


def _read_document(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(
            f"Parameter `spec` should be an existing TOML file. Found `spec = {path}`."
        )
    try:
        document = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML ({error}).") from None
    return document


def _check_tables(root: _Reader) -> None:
    root.check_keys(TABLES)
    missing = [f"[{table}]" for table in REQUIRED_TABLES if table not in root.table]
    if missing:
        # An empty file would otherwise start a whole default study nobody asked for.
        raise ConfigError(
            f"{root.path}: a study file needs a [study] and a [problem] table; "
            f"missing: {', '.join(missing)}."
        )


def _check_baselines(reader: _Reader, names: tuple[str, ...]) -> None:
    from fm_optuna.baselines import BASELINES

    for name in names:
        if name not in BASELINES:
            allowed = "a list of baseline names among " + ", ".join(BASELINES)
            raise reader.error("baselines", name, allowed)


def at_file_keys(message: str) -> str:
    """A configuration error's parameter named by its study-file address (``training.dt``)."""
    match = re.match(r"Parameter `(\w+)`", message)
    if match is None:
        return message
    for entry in schema():
        if entry.key == match.group(1):
            return re.sub(rf"`{entry.key}( = |`)", rf"`{entry.dotted}\1", message)
    return message


def load_spec(path: str | Path) -> StudySpec:
    """Read and validate a study specification; every mistake is a one-line ConfigError."""
    path = Path(path)
    root = _Reader(path, _read_document(path), "")
    _check_tables(root)
    values = _schema_values(root)
    problem = _problem_section(root.sub("problem"))
    try:
        base = ForkMergeConfig(**values[ForkMergeConfig])
        study = StudyOptions(**{"name": path.stem, **values[StudyOptions]})
        runtime = RuntimeOptions(**values[RuntimeOptions])
    except ConfigError as error:
        raise ConfigError(f"{path}: {at_file_keys(str(error))}") from None
    _check_baselines(root.sub("study"), study.baselines)
    space_table = root.sub("space")
    space = _space_section(space_table, base.total_steps)
    if base.keep is not None and space.branches is not None:
        allowed = "absent when training.keep fixes L"
        raise space_table.error("branches", space_table.table["branches"], allowed)
    return StudySpec(path, study, problem, base, space, runtime)


def check_space_searches(spec: StudySpec, n_trials: int) -> None:
    """More than one trial needs a space to search: with none, every trial would train the same
    configuration (the sampler has nothing to vary), so the study would only repeat itself."""
    if n_trials <= 1 or any(getattr(spec.space, f.name) is not None for f in fields(SpaceSection)):
        return
    names = ", ".join(f"space.{f.name}" for f in fields(SpaceSection))
    raise ConfigError(
        f"{spec.path}: Parameter `space` should give at least one of {names} when a study "
        f"runs more than one trial (else every trial trains the same configuration; "
        f"`fm-optuna run` trains one). Found an empty space with n_trials = {n_trials}."
    )


def check_branches_fit(
    spec: StudySpec, problem: Problem, keep: tuple[int, ...] | None = None
) -> None:
    """L (fixed or its searched range) and ``keep`` (else the spec's) must fit the K tasks."""
    n_tasks = len(problem.tasks)
    keep = keep or spec.base.keep
    if keep is not None:
        n_aux = n_tasks if spec.base.plan == "joint" else n_tasks - 1
        try:
            check_keep(keep, n_aux, name="keep" if keep != spec.base.keep else "training.keep")
        except ConfigError as error:
            raise ConfigError(f"{spec.path}: {error}") from None
    highest = spec.space.branches.high if spec.space.branches else spec.base.branches
    if highest is not None and highest > n_tasks:
        key = "space.branches.high" if spec.space.branches else "training.branches"
        raise ConfigError(
            f"{spec.path}: Parameter `{key}` should be at most {n_tasks} (the tasks of "
            f"{problem.name}). Found `{key} = {highest}`."
        )
