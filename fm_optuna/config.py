"""The one configuration schema: every option of a run and of a study, defined once.

Each option is a dataclass field whose metadata (:class:`Option`) carries its help text, allowed
values or range, its study-file section and key and its command-line flag. The CLI flags
(:mod:`fm_optuna.cli`), the study-file parser (:mod:`fm_optuna.study`), the API's keyword
arguments and defaults, ``--help``, the key table of ``studies/README.md``
(:func:`key_table`), the MLflow params (:meth:`ForkMergeConfig.as_params`) and a study's
configuration fingerprint are all read from here, so a default is written in one place only.

It sits at the bottom of the package: the loop, the rankings, the baselines, the outer study and
the CLI all read it, and it reads nothing of theirs but the names of plans, cut rules and
strategies.

Example:
    >>> option_of(ForkMergeConfig, "total_steps").key, ForkMergeConfig.total_steps
    ('steps', 600)
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, TypeAlias

from fm_optuna.core._branches import CUT_RULES, PLANS, check_keep
from fm_optuna.errors import ConfigError, invalid
from fm_optuna.search.strategies import STRATEGIES, make_strategy

if TYPE_CHECKING:
    import torch

OPTIMIZER_POLICIES = ("keep", "reset", "average")
FINAL_MODELS = ("last", "best")
RANKINGS = ("prepass", "given", "affinity", "merge")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULERS = ("none", "cosine", "step")
OUTER_SAMPLERS = ("tpe", "random")
PRUNERS = ("median", "none")
#: Where a study file's tables live; ``runtime`` options sit under ``[study]`` in a file.
SECTIONS = ("study", "problem", "training", "search")

#: ``params -> Optimizer``, e.g. ``functools.partial(torch.optim.RMSprop, lr=1e-3)``.
OptimizerFactory: TypeAlias = "Callable[[Iterable[torch.Tensor]], torch.optim.Optimizer]"
#: ``optimizer -> LRScheduler``, stepped once per optimizer step, e.g.
#: ``functools.partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=1e-2, total_steps=600)``.
SchedulerFactory: TypeAlias = (
    "Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]"
)


@dataclass(frozen=True)
class Option:
    """What the schema knows of one option besides its name, type and default.

    Attributes:
        help: One sentence for ``--help`` and the study-file key table.
        section: The study-file table that holds it (``training``, ``search``, ``study``).
        kind: ``int``, ``float``, ``bool``, ``str``, ``ints`` or ``strs`` (lists).
        key: Its study-file key and API name when it differs from the field's name.
        choices: The allowed strings of a ``str`` option.
        low, high: The allowed range of a number; ``low_open``/``high_open`` exclude the bound.
        optional: ``None`` is allowed (and means "the option's automatic value").
        callable_ok: The API may pass a callable instead of a name (optimizer, scheduler).
        flag: The command-line flag (default ``--key`` with dashes); ``""`` for none.
        fingerprint: Whether it changes what a trial trains (a study refuses a change of it).
        empty_ok: An empty list is allowed (a list option).
        exclusive: Flags sharing this group name exclude each other on the command line.
        allowed_text: What a value may be, where the kind's own words do not say it (a ``str``
            checked by the code that uses it, e.g. the device list).
    """

    help: str
    section: str
    kind: str
    key: str = ""
    choices: tuple[str, ...] = ()
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    optional: bool = False
    callable_ok: bool = False
    flag: str | None = None
    fingerprint: bool = True
    empty_ok: bool = False
    exclusive: str = ""
    allowed_text: str = ""

    def allowed(self, *, api: bool = True) -> str:
        """What a value may be, in the words of an error message (``api``: as the Python API
        takes it, where some options may be callables)."""
        text = self._allowed()
        if self.callable_ok and api:
            text += " or a callable"
        return text

    def _allowed(self) -> str:
        if self.allowed_text:
            return self.allowed_text
        if self.kind == "bool":
            return "true or false"
        if self.kind == "str":
            return "one of " + ", ".join(sorted(self.choices)) if self.choices else "a string"
        if self.kind == "ints":
            return "a list of integers, e.g. [0, 1, 3]"
        if self.kind == "strs":
            return "a list of names"
        return _range_text(self)

    def check(self, name: str, value: Any) -> Any:
        """``value`` normalised (an int as a float, a list as a tuple), or the house-format
        error naming ``name``."""
        if value is None and self.optional:
            return None
        if self.callable_ok and callable(value) and not isinstance(value, str):
            return value
        checked = _CHECKS[self.kind](self, value)
        if checked is _INVALID:
            if _wrong_type(self.kind, value):
                # A type mistake also names the type that came instead (a study file's reader
                # adds the section: `training.dt`).
                raise ConfigError(
                    f"Parameter `{name}` should be {self.allowed()}. Found `{name} = "
                    f"{value!r}` (a {type(value).__name__})."
                )
            raise invalid(name, _shown(value), self.allowed())
        return checked


_KIND_TYPES: dict[str, tuple[type, ...]] = {
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
    "str": (str,),
    "ints": (list, tuple),
    "strs": (list, tuple),
}


def _wrong_type(kind: str, value: Any) -> bool:
    """Whether ``value`` is of a type option ``kind`` never takes (not a bad value of its type)."""
    if isinstance(value, bool):
        return kind != "bool"
    return not isinstance(value, _KIND_TYPES[kind])


_INVALID = object()


def _shown(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    return value


def _range_text(option: Option) -> str:
    noun = "integer" if option.kind == "int" else "number"
    low, high = option.low, option.high
    if high is None:
        if low is None:
            return f"a finite {noun}" if noun == "number" else "an integer"
        if low == 0:
            return f"a positive {noun}" if option.low_open else f"a non-negative {noun}"
        if low == 1 and noun == "integer":
            return "a positive integer"
        return f"an {noun} of at least {_plain(low)}"
    left, right = "(" if option.low_open else "[", ")" if option.high_open else "]"
    return f"a {noun} in {left}{_plain(low)}, {_plain(high)}{right}"


def _plain(number: float | None) -> str:
    return f"{number:g}"


def _in_range(option: Option, value: float) -> bool:
    if option.low is not None and (value < option.low or (option.low_open and value == option.low)):
        return False
    return option.high is None or not (
        value > option.high or (option.high_open and value == option.high)
    )


def _check_int(option: Option, value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, int) or not _in_range(option, value):
        return _INVALID
    return value


def _check_float(option: Option, value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return _INVALID
    if not math.isfinite(value) or not _in_range(option, value):
        return _INVALID
    return float(value)


def _check_bool(option: Option, value: Any) -> Any:
    return value if isinstance(value, bool) else _INVALID


def _check_str(option: Option, value: Any) -> Any:
    if not isinstance(value, str) or (option.choices and value not in option.choices):
        return _INVALID
    return value


def _check_list(item: type) -> Callable[[Option, Any], Any]:
    def check(option: Option, value: Any) -> Any:
        if not isinstance(value, list | tuple) or not (value or option.empty_ok):
            return _INVALID
        if not all(isinstance(v, item) and not isinstance(v, bool) for v in value):
            return _INVALID
        return tuple(value)

    return check


_CHECKS: dict[str, Callable[[Option, Any], Any]] = {
    "int": _check_int,
    "float": _check_float,
    "bool": _check_bool,
    "str": _check_str,
    "ints": _check_list(int),
    "strs": _check_list(str),
}


def option(default: Any, help: str, *, section: str, kind: str, **meta: Any) -> Any:
    """A dataclass field that is an option of the schema (see :class:`Option`)."""
    return dataclasses.field(
        default=default, metadata={"option": Option(help, section, kind, **meta)}
    )


@dataclass(frozen=True)
class SchemaEntry:
    """One option as every door sees it: its field, its metadata and its default."""

    name: str
    option: Option
    default: Any
    owner: type

    @property
    def key(self) -> str:
        return self.option.key or self.name

    @property
    def flag(self) -> str:
        if self.option.flag is not None:
            return self.option.flag
        return "--" + self.key.replace("_", "-")

    @property
    def dotted(self) -> str:
        """Its study-file address, e.g. ``training.steps``."""
        return f"{self.option.section}.{self.key}"


def schema(*owners: type) -> Iterator[SchemaEntry]:
    """Every option of the given schema dataclasses (default: all of them), in field order."""
    for owner in owners or SCHEMA_CLASSES:
        for f in fields(owner):
            if "option" in f.metadata:
                yield SchemaEntry(f.name, f.metadata["option"], f.default, owner)


def option_of(owner: type, name: str) -> Option:
    """The :class:`Option` of field ``name`` of ``owner``."""
    for entry in schema(owner):
        if entry.name == name:
            return entry.option
    raise KeyError(name)


def _check_fields(instance: Any) -> None:
    """Every option of a schema dataclass against its metadata (normalised in place)."""
    for entry in schema(type(instance)):
        value = entry.option.check(entry.key, getattr(instance, entry.name))
        object.__setattr__(instance, entry.name, value)


def factory_name(value: object) -> str:
    """A loggable name for a configured value: a string as is, a callable by its qualified name.

    Example:
        >>> factory_name("adam"), factory_name(functools.partial(max, 1))
        ('adam', 'partial(max)')
    """
    if isinstance(value, str):
        return value
    if isinstance(value, functools.partial):
        return f"partial({factory_name(value.func)})"
    name = getattr(value, "__qualname__", None) or type(value).__qualname__
    module = getattr(value, "__module__", None)
    return f"{module}.{name}" if module and module != "builtins" else name


T, S = "training", "search"


@dataclass(frozen=True)
class ForkMergeConfig:
    """Everything that defines a ForkMerge run (and a baseline's budget and optimiser); logged
    as run parameters and checkpointed. Each field's help, range, study-file key and flag are in
    its :class:`Option`; ``fm-optuna run --help`` and ``studies/README.md`` list them.

    The API may give ``optimizer`` as a callable ``params -> Optimizer`` and ``scheduler`` as a
    callable ``optimizer -> LRScheduler`` instead of a name.
    """

    dt: int = option(100, "merge interval Δt in optimizer steps", section=T, kind="int", low=1)
    total_steps: int = option(
        600, "training budget T in optimizer steps", section=T, kind="int", low=1, key="steps"
    )
    branches: int | None = option(
        None,
        "number of branches L (default: max(2, ceil(log2 K)) for pruned, K for pairwise; "
        "the length of keep when it is given)",
        section=T,
        kind="int",
        low=2,
        optional=True,
    )
    plan: str = option(
        "pruned",
        "branch plan: pruned (Alg. 4), pairwise (Alg. 1/2) or joint (App. A.4)",
        section=T,
        kind="str",
        choices=PLANS,
    )
    ranking: str = option(
        "prepass",
        "auxiliary ranking for the pruned plan: prepass trains target+aux for ranking_steps from "
        "the initial model and ranks by target validation (the official code); affinity ranks by "
        "the lookahead inter-task affinity of Fifty et al.; merge by the Λ_k one Alg. 2 merge "
        "gives each auxiliary (the paper's Alg. 4); given uses aux_order, else the task order",
        section=T,
        kind="str",
        choices=RANKINGS,
    )
    ranking_steps: int | None = option(
        None,
        "steps of each pre-pass run, or of the affinity run (default: Δt)",
        section=T,
        kind="int",
        low=1,
        optional=True,
    )
    aux_order: tuple[str, ...] | None = option(
        None,
        "best-first auxiliaries for ranking = given",
        section=T,
        kind="strs",
        optional=True,
    )
    cut: str = option(
        "auto",
        "which intermediate branches ν^k a pruned plan keeps: auto cuts the relevance ranking "
        "where a drop stands out of the noise and spreads the other cuts evenly; spread cuts "
        "evenly; gaps cuts at the largest drops however small",
        section=T,
        kind="str",
        choices=CUT_RULES,
    )
    keep: tuple[int, ...] | None = option(
        None,
        "explicit top-k counts of the kept branches from 0 (target only) to n (all auxiliaries), "
        "as the official code's lists, e.g. 0,1,3; sets L to their number and overrides cut",
        section=T,
        kind="ints",
        optional=True,
    )
    optimizer_policy: str = option(
        "keep",
        "optimizer state at a merge: keep (each branch keeps its moments, as the official code), "
        "reset, or average (moments averaged by Λ)",
        section=T,
        kind="str",
        choices=OPTIMIZER_POLICIES,
    )
    final: str = option(
        "last",
        "final model: the last or the best-validated merge",
        section=T,
        kind="str",
        choices=FINAL_MODELS,
    )
    optimizer: str | OptimizerFactory = option(
        "adam",
        "optimizer of every branch, baseline and pre-pass run",
        section=T,
        kind="str",
        choices=OPTIMIZERS,
        callable_ok=True,
    )
    lr: float = option(
        1e-3,
        "learning rate of the named optimizer",
        section=T,
        kind="float",
        low=0,
        low_open=True,
    )
    momentum: float = option(
        0.0,
        "SGD momentum (optimizer = sgd only)",
        section=T,
        kind="float",
        low=0,
        high=1,
        high_open=True,
    )
    weight_decay: float = option(
        0.0,
        "weight decay of the named optimizer (decoupled for adamw)",
        section=T,
        kind="float",
        low=0,
    )
    scheduler: str | SchedulerFactory = option(
        "none",
        "learning-rate schedule over T, stepped every optimizer step: none, cosine (to 0 over T) "
        "or step (× lr_gamma every lr_step_size steps); each branch keeps its own across merges",
        section=T,
        kind="str",
        choices=SCHEDULERS,
        callable_ok=True,
    )
    lr_step_size: int | None = option(
        None,
        "step schedule: decay every this many steps (default: T/3)",
        section=T,
        kind="int",
        low=1,
        optional=True,
    )
    lr_gamma: float = option(
        0.1,
        "step schedule: decay factor",
        section=T,
        kind="float",
        low=0,
        high=1,
        low_open=True,
    )
    clip_grad_norm: float | None = option(
        None,
        "clip the gradient's 2-norm to this before each step (default: no clipping)",
        section=T,
        kind="float",
        low=0,
        low_open=True,
        optional=True,
    )
    amp: bool = option(
        False,
        "automatic mixed precision on CUDA (ignored, with a note, on CPU)",
        section=T,
        kind="bool",
    )
    log_every: int = option(
        25,
        "steps between training-loss reports",
        section=T,
        kind="int",
        low=1,
        fingerprint=False,
    )
    parallel_branches: bool = option(
        False,
        "train a round's branches at the same time: on the CPU one process per branch with one "
        "intra-op thread each (the same result as one after another), on CUDA one stream per "
        "branch, on several CUDA devices (device) one thread per device; `fm-optuna bench` "
        "measures the first two",
        section=T,
        kind="bool",
        fingerprint=False,
    )
    strategy: str = option(
        "tpe",
        "merge-search strategy (default tpe: in the digits replays it came within 0.1 pp of the "
        "best known Λ on most merges at 20 evaluations for L = 3 to 5, at the cost per "
        "evaluation of greedy; see studies/README.md)",
        section=S,
        kind="str",
        choices=tuple(STRATEGIES),
    )
    merge_trials: int = option(
        20,
        "inner-study budget of the strategies that take one (tpe, binary, cmaes, random, "
        "gp, gradient)",
        section=S,
        kind="int",
        low=1,
    )
    grid_resolution: float = option(
        0.1, "lattice step of grid", section=S, kind="float", low=0, high=1, low_open=True
    )
    warm_start: bool = option(
        True,
        "start each merge search from the previous merge's Λ (strategies that take a starting "
        "point); off, every search starts afresh from the branches' own scores",
        section=S,
        kind="bool",
    )
    full_evaluation: bool = option(
        False,
        "score every candidate on the whole validation set (by default grid, random and tpe "
        "candidates on problems that score examples one by one stop once they can change "
        "neither the decision nor the sampler's next proposals: the same search, fewer forwards)",
        section=S,
        kind="bool",
        exclusive="evaluation",
    )
    pruned_evaluation: bool = option(
        False,
        "stop candidates once they can no longer win, even if the sampler's later proposals "
        "change: exactly where the problem scores examples one by one, else by prune_sigmas; "
        "the chosen merge is always fully evaluated",
        section=S,
        kind="bool",
        exclusive="evaluation",
    )
    evaluation_chunks: int = option(
        4,
        "validation parts a candidate is scored in when it may be stopped",
        section=S,
        kind="int",
        low=2,
    )
    prune_sigmas: float = option(
        2.0,
        "problems scored chunk by chunk only (QM9): a candidate is stopped when it trails the "
        "best finished one by more than this many standard errors of what the remaining chunks "
        "could add (0 stops at any deficit)",
        section=S,
        kind="float",
        low=0,
    )
    seed: int = option(
        0,
        "seed of initialisation, data order, inner studies and the outer sampler",
        section="study",
        kind="int",
        low=0,
    )

    def __post_init__(self) -> None:
        _check_fields(self)
        if self.dt > self.total_steps:
            raise invalid("dt", self.dt, f"an integer from 1 to steps ({self.total_steps})")
        if self.full_evaluation and self.pruned_evaluation:
            raise invalid(
                "full_evaluation", True, "false when pruned_evaluation is true (choose one)"
            )
        if self.keep is not None:
            self._check_keep()
        if self.momentum and self.optimizer != "sgd":
            raise invalid("momentum", self.momentum, "0 unless optimizer = sgd")
        if self.weight_decay and not isinstance(self.optimizer, str):
            raise invalid("weight_decay", self.weight_decay, "0 with an optimizer factory")
        make_strategy(self.strategy, resolution=self.grid_resolution)  # validates its options

    def _check_keep(self) -> None:
        assert self.keep is not None
        check_keep(self.keep)
        if self.plan == "pairwise":
            raise invalid("keep", _joined(self.keep), "used only with the pruned or joint plan")
        if self.branches is None:
            object.__setattr__(self, "branches", len(self.keep))
        elif self.branches != len(self.keep):
            raise invalid("branches", self.branches, f"{len(self.keep)} (the length of keep)")

    @property
    def rounds(self) -> int:
        return math.ceil(self.total_steps / self.dt)

    @property
    def evaluation(self) -> str:
        """How merge candidates are scored: ``exact`` (default), ``full`` or ``pruned``."""
        return "pruned" if self.pruned_evaluation else "full" if self.full_evaluation else "exact"

    def as_params(self) -> dict[str, Any]:
        """The MLflow params: every option by its field name, lists joined, callables named."""
        # Not asdict: it would deep-copy an optimizer or scheduler factory.
        params = {f.name: getattr(self, f.name) for f in fields(self)}
        params["aux_order"] = ",".join(self.aux_order) if self.aux_order else None
        params["keep"] = _joined(self.keep) if self.keep else None
        params["optimizer"] = factory_name(self.optimizer)
        params["scheduler"] = factory_name(self.scheduler)
        return params


def _joined(values: tuple[int, ...]) -> str:
    return ",".join(str(value) for value in values)


DEFAULT_OPTUNA_STORAGE = "sqlite:///tracking/optuna.db"


@dataclass(frozen=True)
class StudyOptions:
    """The outer study's own options (``[study]`` of a study file, ``fm_optuna.tune``'s keyword
    arguments); none of them changes what a trial trains."""

    name: str = option(
        "",
        "study name (default: the file's stem)",
        section="study",
        kind="str",
        flag="",
        fingerprint=False,
    )
    n_trials: int = option(
        8,
        "finished (complete or pruned) trials the study grows to",
        section="study",
        kind="int",
        low=1,
        fingerprint=False,
    )
    sampler: str = option(
        "tpe",
        "outer sampler over the space (seeded by seed, never repeating a trial)",
        section="study",
        kind="str",
        choices=OUTER_SAMPLERS,
        flag="",
        fingerprint=False,
    )
    pruner: str = option(
        "median",
        "outer pruner: median (aligned on training steps) or none",
        section="study",
        kind="str",
        choices=PRUNERS,
        flag="",
        fingerprint=False,
    )
    storage: str = option(
        DEFAULT_OPTUNA_STORAGE,
        "Optuna storage URL (sqlite:///path.db, postgresql://user:password@host/db, or "
        "grpc://host:port for a `fm-optuna storage-proxy`)",
        section="study",
        kind="str",
        fingerprint=False,
    )
    tracking_uri: str | None = option(
        None,
        "MLflow store: sqlite:///path.db, postgresql://… or an http(s):// MLflow server "
        "(default: $MLFLOW_TRACKING_URI, else sqlite:///tracking/mlflow.db)",
        section="study",
        kind="str",
        optional=True,
        fingerprint=False,
    )
    heartbeat_seconds: int = option(
        10,
        "seconds between a running trial's heartbeats (a silent trial is retried)",
        section="study",
        kind="int",
        low=1,
        flag="",
        fingerprint=False,
    )
    max_retry: int = option(
        2,
        "retries of a trial whose worker died",
        section="study",
        kind="int",
        low=0,
        flag="",
        fingerprint=False,
    )
    checkpoint_dir: str = option(
        "tracking/checkpoints",
        "where trials checkpoint every merge and save their final model",
        section="study",
        kind="str",
        flag="",
        fingerprint=False,
    )
    keep_checkpoints: bool = option(
        False,
        "keep a finished trial's merge checkpoint (trial_<n>.ckpt); by default it is removed "
        "once the trial will not be retried (its final model is always kept)",
        section="study",
        kind="bool",
        flag="",
        fingerprint=False,
    )
    baselines: tuple[str, ...] = option(
        (),
        "baselines trained once with the best trial's budget for the final summary, e.g. "
        '["stl", "ew"]',
        section="study",
        kind="strs",
        empty_ok=True,
        flag="",
        fingerprint=False,
    )
    save_merge_problems: bool = option(
        False,
        "save every merge's problem to the output folder and MLflow (for compare --replay)",
        section=S,
        kind="bool",
        flag="",
        fingerprint=False,
    )

    def __post_init__(self) -> None:
        _check_fields(self)  # the baselines' names are checked by the study that trains them
        object.__setattr__(self, "baselines", tuple(dict.fromkeys(self.baselines)))


@dataclass(frozen=True)
class RuntimeOptions:
    """Where and how a process trains; never part of what a trial trains."""

    device: str | None = option(
        None,
        "where to train (default: cuda if available, else cpu); with parallel_branches one "
        "device per branch: branch i on device i mod n, the problem built on each, the merge "
        "and checkpoints on the first (commands other than run and tune use the first)",
        section="study",
        kind="str",
        optional=True,
        fingerprint=False,
        allowed_text="a torch device (cpu, cuda or cuda:N), or with parallel_branches = true "
        "a comma-separated list of CUDA devices (cuda:0,cuda:1)",
    )
    threads: int | None = option(
        1,
        "intra-op CPU threads of this process (1 by default: `fm-optuna bench --measure-threads` "
        "shows why; the API's threads=None leaves torch's own setting)",
        section="study",
        kind="int",
        low=1,
        optional=True,
        fingerprint=False,
    )

    def __post_init__(self) -> None:
        _check_fields(self)


SCHEMA_CLASSES: tuple[type, ...] = (ForkMergeConfig, StudyOptions, RuntimeOptions)


def key_table() -> str:
    """The study-file keys as a Markdown table (written into ``studies/README.md``)."""
    rows = ["| key | default | allowed | what |", "| --- | --- | --- | --- |"]
    for entry in sorted(schema(), key=lambda e: SECTIONS.index(e.option.section)):
        default = "—" if entry.default in (None, "", ()) else f"`{_toml(entry.default)}`"
        rows.append(
            f"| `{entry.dotted}` | {default} | {entry.option.allowed()} | {entry.option.help} |"
        )
    return "\n".join(rows)


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return f'"{value}"'
    return f"{value:g}" if isinstance(value, float) else str(value)


def fingerprint_keys() -> list[str]:
    """The dotted study-file keys that change what a trial trains."""
    return [entry.dotted for entry in schema() if entry.option.fingerprint]


__all__ = [
    "ConfigError",
    "ForkMergeConfig",
    "Option",
    "RuntimeOptions",
    "StudyOptions",
    "key_table",
    "option_of",
    "schema",
]


def write_key_table(path: str = "studies/README.md") -> None:
    """Rewrite the generated key table between its markers in ``path``."""
    from pathlib import Path

    text = Path(path).read_text()
    begin, end = text.index("<!-- keys:begin"), text.index("<!-- keys:end -->")
    marker = text[begin : text.index("-->", begin) + 3]
    Path(path).write_text(text[:begin] + marker + "\n" + key_table() + "\n" + text[end:])


if __name__ == "__main__":
    write_key_table()
