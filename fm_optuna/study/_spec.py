"""Study specifications (``studies/*.toml``) parsed into typed, validated configuration.

Every mistake is one :class:`ConfigError` naming the file, the key and what is allowed, raised
before anything is created in any store.

Example:
    >>> spec = load_spec("studies/digits.toml")  # doctest: +SKIP
    >>> spec.study.name, spec.space.dt.low
    ('digits-uci', 50)
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fm_optuna.benchmarks import resolve
from fm_optuna.config import (
    FINAL_MODELS,
    OPTIMIZER_POLICIES,
    OPTIMIZERS,
    RANKINGS,
    SCHEDULERS,
    ForkMergeConfig,
)
from fm_optuna.core._branches import CUT_RULES, PLANS, check_keep
from fm_optuna.errors import ConfigError
from fm_optuna.search.strategies import STRATEGIES

if TYPE_CHECKING:
    from fm_optuna.problem._tasks import Problem

DEFAULT_OPTUNA_STORAGE = "sqlite:///tracking/optuna.db"
OUTER_SAMPLERS = ("tpe", "random")
PRUNERS = ("median", "none")
REQUIRED_TABLES = ("study", "problem")


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
class StudySection:
    name: str
    n_trials: int = 8
    seed: int = 0
    sampler: str = "tpe"
    pruner: str = "median"
    storage: str = DEFAULT_OPTUNA_STORAGE
    tracking_uri: str | None = None  # None: MLFLOW_TRACKING_URI, else the local SQLite store
    heartbeat_seconds: int = 10
    max_retry: int = 2
    checkpoint_dir: str = "tracking/checkpoints"
    # Baselines trained once with the best trial's budget, for the summary `tune` ends with.
    baselines: tuple[str, ...] = ()


@dataclass(frozen=True)
class ProblemSection:
    benchmark: str = "digits"  # a shipped benchmark, a plugin's name or module.path:factory
    target: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)  # benchmark-specific options


@dataclass(frozen=True)
class TrainingSection:
    steps: int = 600
    dt: int = 100  # used by `compare` and as the default when the space does not search Δt
    branches: int | None = None
    lr: float = 1e-3
    plan: str = "pruned"
    ranking: str = "prepass"
    cut: str = "auto"  # which intermediate ν^k a pruned plan keeps (fm_optuna.core._branches)
    keep: tuple[int, ...] | None = None  # explicit top-k counts, e.g. [0, 1, 3]
    optimizer_policy: str = "keep"
    final: str = "last"
    optimizer: str = "adam"
    momentum: float = 0.0
    weight_decay: float = 0.0
    scheduler: str = "none"
    lr_step_size: int | None = None
    lr_gamma: float = 0.1
    clip_grad_norm: float | None = None
    amp: bool = False


@dataclass(frozen=True)
class SearchSection:
    strategy: str = "greedy"
    merge_trials: int = 20
    grid_resolution: float = 0.1
    full_evaluation: bool = False
    pruned_evaluation: bool = False
    evaluation_chunks: int = 4
    prune_sigmas: float = 2.0
    save_merge_problems: bool = False  # every merge's problem to the output folder and MLflow


@dataclass(frozen=True)
class SpaceSection:
    dt: IntRange | None = None
    branches: IntRange | None = None
    lr: FloatRange | None = None
    optimizer_policy: tuple[str, ...] | None = None


@dataclass(frozen=True)
class StudySpec:
    path: Path | str  # the file, or the call that built the spec (named in messages)
    study: StudySection
    problem: ProblemSection
    training: TrainingSection
    search: SearchSection
    space: SpaceSection

    def config(self, **overrides: Any) -> ForkMergeConfig:
        """The ForkMerge configuration for fixed values plus ``overrides`` (an outer trial's)."""
        values: dict[str, Any] = {
            "dt": self.training.dt,
            "total_steps": self.training.steps,
            "branches": self.training.branches,
            "lr": self.training.lr,
            "plan": self.training.plan,
            "ranking": self.training.ranking,
            "cut": self.training.cut,
            "keep": self.training.keep,
            "optimizer_policy": self.training.optimizer_policy,
            "final": self.training.final,
            "optimizer": self.training.optimizer,
            "momentum": self.training.momentum,
            "weight_decay": self.training.weight_decay,
            "scheduler": self.training.scheduler,
            "lr_step_size": self.training.lr_step_size,
            "lr_gamma": self.training.lr_gamma,
            "clip_grad_norm": self.training.clip_grad_norm,
            "amp": self.training.amp,
            "strategy": self.search.strategy,
            "merge_trials": self.search.merge_trials,
            "grid_resolution": self.search.grid_resolution,
            "full_evaluation": self.search.full_evaluation,
            "pruned_evaluation": self.search.pruned_evaluation,
            "evaluation_chunks": self.search.evaluation_chunks,
            "prune_sigmas": self.search.prune_sigmas,
            "seed": self.study.seed,
        }
        values.update(overrides)
        return ForkMergeConfig(**values)

    def build_problem(self, *, device: Any, target: str | None = None) -> Problem:
        """The ``[problem]`` built (``target`` overrides the spec's) and checked; a mistake is
        one line naming this file."""
        from fm_optuna.benchmarks import build_problem

        try:
            return build_problem(
                self.problem.benchmark,
                target=target or self.problem.target,
                seed=self.study.seed,
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
            f"Found `{self.prefix}{key} = {value!r}`."
        )

    def check_keys(self, allowed: Any) -> None:
        for key in self.table:
            if key not in allowed:
                raise ConfigError(
                    f"{self.path}: unknown key `{self.prefix}{key}`; allowed keys: "
                    + ", ".join(sorted(allowed))
                    + "."
                )

    def int(self, key: str, default: Any, *, minimum: int | None = None) -> Any:
        value = self.table.get(key, default)
        if value is None and default is None:
            return None
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or (minimum is not None and value < minimum)
        ):
            allowed = "an integer" if minimum is None else f"an integer ≥ {minimum}"
            raise self.error(key, value, allowed)
        return value

    def float(self, key: str, default: float, *, positive: bool = False) -> float:
        value = self.table.get(key, default)
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or (positive and value <= 0)
        ):
            raise self.error(key, value, "a positive number" if positive else "a number")
        return float(value)

    def str(self, key: str, default: Any, choices: Any = None) -> Any:
        value = self.table.get(key, default)
        if value is None and default is None:
            return None
        if not isinstance(value, str) or (choices is not None and value not in choices):
            allowed = "a string" if choices is None else "one of " + ", ".join(choices)
            raise self.error(key, value, allowed)
        return value

    def bool(self, key: str, default: bool) -> bool:
        value = self.table.get(key, default)
        if not isinstance(value, bool):
            raise self.error(key, value, "true or false")
        return value

    def sub(self, key: str) -> _Reader:
        value = self.table.get(key, {})
        if not isinstance(value, Mapping):
            raise self.error(key, value, "a table")
        return _Reader(self.path, value, f"{self.prefix}{key}.")


def _field_names(cls: type) -> set[str]:
    return {f.name for f in fields(cls)}


def _non_negative(table: _Reader, key: str, default: float) -> float:
    value = table.float(key, default)
    if value < 0:
        raise table.error(key, value, "a non-negative number")
    return value


def _int_range(reader: _Reader, key: str, *, minimum: int) -> IntRange | None:
    if key not in reader.table:
        return None
    table = reader.sub(key)
    table.check_keys({"low", "high", "log"})
    low = table.int("low", None, minimum=minimum)
    high = table.int("high", None, minimum=minimum)
    if low is None or high is None:
        raise reader.error(key, reader.table[key], "a table with integer `low` and `high`")
    if low > high:
        raise reader.error(key, reader.table[key], "a non-empty range (low ≤ high)")
    return IntRange(low, high, table.bool("log", False))


def _int_list(reader: _Reader, key: str) -> tuple[int, ...] | None:
    value = reader.table.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or not all(
        isinstance(item, int) and not isinstance(item, bool) for item in value
    ):
        raise reader.error(key, value, "a list of integers, e.g. [0, 1, 3]")
    return tuple(value)


def _baselines(reader: _Reader) -> tuple[str, ...]:
    from fm_optuna.baselines import BASELINES

    value = reader.table.get("baselines", [])
    allowed = "a list of baseline names among " + ", ".join(BASELINES)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise reader.error("baselines", value, allowed)
    for name in value:
        if name not in BASELINES:
            raise reader.error("baselines", name, allowed)
    return tuple(dict.fromkeys(value))


def _problem_section(p: _Reader) -> ProblemSection:
    """[problem]: the problem's source is resolved now (an unimportable module is one line);
    targets and options are checked against what the factory declares."""
    benchmark = p.str("benchmark", "digits")
    try:
        source = resolve(benchmark)
    except ConfigError as error:
        raise ConfigError(f"{p.path}: {error}") from None
    target = p.str("target", None, source.targets)
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


def _space_section(r: _Reader, steps: int) -> SpaceSection:
    r.check_keys(_field_names(SpaceSection))
    dt = _int_range(r, "dt", minimum=1)
    if dt is not None and dt.high > steps:
        raise r.error("dt", r.table["dt"], f"a range within 1..training.steps ({steps})")
    branches = _int_range(r, "branches", minimum=2)
    lr = None
    if "lr" in r.table:
        lt = r.sub("lr")
        lt.check_keys({"low", "high", "log"})
        lr = FloatRange(
            lt.float("low", 0, positive=True),
            lt.float("high", 0, positive=True),
            lt.bool("log", False),
        )
        if lr.low > lr.high:
            raise r.error("lr", r.table["lr"], "a non-empty range (low ≤ high)")
    policies = r.table.get("optimizer_policy")
    if policies is not None and (
        not isinstance(policies, list)
        or not policies
        or any(p not in OPTIMIZER_POLICIES for p in policies)
    ):
        raise r.error(
            "optimizer_policy", policies, "a non-empty list of " + ", ".join(OPTIMIZER_POLICIES)
        )
    return SpaceSection(dt, branches, lr, tuple(policies) if policies else None)


def load_spec(path: str | Path) -> StudySpec:
    """Read and validate a study specification; every mistake is a one-line ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"Parameter `spec` should be an existing TOML file. Found `spec = {path}`."
        )
    try:
        document = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML ({error}).") from None
    root = _Reader(path, document, "")
    root.check_keys({"study", "problem", "training", "search", "space"})
    missing = [f"[{table}]" for table in REQUIRED_TABLES if table not in document]
    if missing:
        # An empty file would otherwise start a whole default study nobody asked for.
        raise ConfigError(
            f"{path}: a study file needs a [study] and a [problem] table; "
            f"missing: {', '.join(missing)}."
        )

    s = root.sub("study")
    s.check_keys(_field_names(StudySection))
    study = StudySection(
        name=s.str("name", path.stem),
        n_trials=s.int("n_trials", 8, minimum=1),
        seed=s.int("seed", 0, minimum=0),
        sampler=s.str("sampler", "tpe", OUTER_SAMPLERS),
        pruner=s.str("pruner", "median", PRUNERS),
        storage=s.str("storage", DEFAULT_OPTUNA_STORAGE),
        tracking_uri=s.str("tracking_uri", None),
        heartbeat_seconds=s.int("heartbeat_seconds", 10, minimum=1),
        max_retry=s.int("max_retry", 2, minimum=0),
        checkpoint_dir=s.str("checkpoint_dir", "tracking/checkpoints"),
        baselines=_baselines(s),
    )

    problem = _problem_section(root.sub("problem"))

    t = root.sub("training")
    t.check_keys(_field_names(TrainingSection))
    steps = t.int("steps", 600, minimum=1)
    training = TrainingSection(
        steps=steps,
        dt=t.int("dt", min(100, steps), minimum=1),
        branches=t.int("branches", None, minimum=2),
        lr=t.float("lr", 1e-3, positive=True),
        plan=t.str("plan", "pruned", PLANS),
        ranking=t.str("ranking", "prepass", RANKINGS),
        cut=t.str("cut", "auto", CUT_RULES),
        keep=_int_list(t, "keep"),
        optimizer_policy=t.str("optimizer_policy", "keep", OPTIMIZER_POLICIES),
        final=t.str("final", "last", FINAL_MODELS),
        optimizer=t.str("optimizer", "adam", OPTIMIZERS),
        momentum=t.float("momentum", 0.0),
        weight_decay=t.float("weight_decay", 0.0),
        scheduler=t.str("scheduler", "none", SCHEDULERS),
        lr_step_size=t.int("lr_step_size", None, minimum=1),
        lr_gamma=t.float("lr_gamma", 0.1, positive=True),
        clip_grad_norm=(
            t.float("clip_grad_norm", 1.0, positive=True) if "clip_grad_norm" in t.table else None
        ),
        amp=t.bool("amp", False),
    )
    if training.dt > steps:
        raise t.error("dt", training.dt, f"at most training.steps ({steps})")

    q = root.sub("search")
    q.check_keys(_field_names(SearchSection))
    search = SearchSection(
        strategy=q.str("strategy", "greedy", STRATEGIES),
        merge_trials=q.int("merge_trials", 20, minimum=1),
        grid_resolution=q.float("grid_resolution", 0.1, positive=True),
        full_evaluation=q.bool("full_evaluation", False),
        pruned_evaluation=q.bool("pruned_evaluation", False),
        evaluation_chunks=q.int("evaluation_chunks", 4, minimum=2),
        prune_sigmas=_non_negative(q, "prune_sigmas", 2.0),
        save_merge_problems=q.bool("save_merge_problems", False),
    )
    if search.full_evaluation and search.pruned_evaluation:
        raise q.error("full_evaluation", True, "false when search.pruned_evaluation is true")

    space_table = root.sub("space")
    space = _space_section(space_table, steps)
    if training.keep is not None and space.branches is not None:
        allowed = "absent when training.keep fixes L"
        raise space_table.error("branches", space_table.table["branches"], allowed)
    spec = StudySpec(path, study, problem, training, search, space)
    try:
        spec.config()  # the fixed part must be a valid configuration on its own
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
    return spec


def check_branches_fit(
    spec: StudySpec, problem: Problem, keep: tuple[int, ...] | None = None
) -> None:
    """L (fixed or its searched range) and ``keep`` (else the spec's) must fit the K tasks."""
    n_tasks = len(problem.tasks)
    keep = keep or spec.training.keep
    if keep is not None:
        n_aux = n_tasks if spec.training.plan == "joint" else n_tasks - 1
        try:
            check_keep(keep, n_aux, name="keep" if keep != spec.training.keep else "training.keep")
        except ConfigError as error:
            raise ConfigError(f"{spec.path}: {error}") from None
    highest = spec.space.branches.high if spec.space.branches else spec.training.branches
    if highest is not None and highest > n_tasks:
        key = "space.branches.high" if spec.space.branches else "training.branches"
        raise ConfigError(
            f"{spec.path}: Parameter `{key}` should be at most {n_tasks} (the tasks of "
            f"{problem.name}). Found `{key} = {highest}`."
        )
