"""Problems by name: the shipped benchmarks, installed plugins and ``module.path:factory``.

A *problem source* is anything that names a factory ``build(*, target, seed, device, **options)
-> Problem``:

- a shipped benchmark (``digits``, ``qm9``, ...): one module here exposing ``TARGETS``,
  ``DEFAULT_TARGET`` and ``build``;
- an installed plugin: an entry point of the group ``fm_optuna.problems`` whose value is
  ``package.module:factory`` (listed by ``fm-optuna run --help``);
- ``module.path:factory``: a module importable from the working directory or an installed
  package, e.g. ``examples.diabetes:build``.

The factory's module may define ``TARGETS`` and ``DEFAULT_TARGET`` as the shipped modules do;
without them the target is checked against the built problem's tasks
(:func:`fm_optuna.problem.check_problem`). Its keyword options are its parameters besides
``target``, ``seed`` and ``device``; a factory with ``**options`` accepts any.

Example:
    >>> source = resolve("digits")
    >>> source.default_target, "batch_size" in source.options
    ('uci', True)
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from typing import TYPE_CHECKING, Any

from fm_optuna.errors import ConfigError, invalid, one_of

if TYPE_CHECKING:
    import torch

    from fm_optuna.problem._tasks import Problem

_MODULES = {
    "digits": "fm_optuna.benchmarks.digits",
    "multimnist": "fm_optuna.benchmarks.multimnist",
    "qm9": "fm_optuna.benchmarks.qm9",
    "movielens": "fm_optuna.benchmarks.movielens",
    # The paper's data sets, read from a local folder (option `data_dir`).
    "nyuv2": "fm_optuna.benchmarks.nyuv2",
    "domainnet": "fm_optuna.benchmarks.domainnet",
    "aliexpress": "fm_optuna.benchmarks.aliexpress",
}

BENCHMARKS: tuple[str, ...] = tuple(_MODULES)
#: Entry-point group of installed problem plugins: ``name = "package.module:factory"``.
ENTRY_POINT_GROUP = "fm_optuna.problems"
_FIXED = ("target", "seed", "device")
_ALLOWED = (
    "a shipped benchmark (" + ", ".join(BENCHMARKS) + "), an installed plugin of the entry-point "
    f"group {ENTRY_POINT_GROUP} or module.path:factory"
)


@dataclass(frozen=True)
class ProblemSource:
    """A resolved problem name: its factory and what is known of it before building.

    Attributes:
        name: The name as given (``digits``, a plugin's name or ``module.path:factory``).
        factory: ``factory(*, target, seed, device, **options) -> Problem``.
        targets: Tasks that may be the target, when the module declares ``TARGETS``.
        default_target: ``DEFAULT_TARGET`` of the module, if any.
        options: The factory's keyword options (besides target, seed, device).
        any_option: Whether the factory takes ``**options``.
        shipped: One of the benchmarks inside fm_optuna.
        runtime_options: Options that change how fast the problem runs but not what it trains
            (the module's ``RUNTIME_OPTIONS``, e.g. DomainNet's ``workers``): a study's
            fingerprint leaves them out, so changing them does not refuse the study.
    """

    name: str
    factory: Callable[..., Problem]
    targets: tuple[str, ...] | None
    default_target: str | None
    options: tuple[str, ...]
    any_option: bool
    shipped: bool = False
    runtime_options: tuple[str, ...] = ()

    def accepts(self, option: str) -> bool:
        return self.any_option or option in self.options


def plugins() -> dict[str, str]:
    """Installed problem plugins: entry-point name → ``module:factory``."""
    return {ep.name: ep.value for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


def describe_sources() -> str:
    """One line for ``--help``: what ``--benchmark`` accepts on this machine."""
    installed = plugins()
    extra = f"; installed plugins: {', '.join(sorted(installed))}" if installed else ""
    return f"one of {', '.join(BENCHMARKS)}{extra}; or module.path:factory"


def _import(path: str, name: str) -> Any:
    """``module.path:attr`` → the attribute; the working directory is importable, as for
    ``python -m``."""
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute.isidentifier():
        raise invalid("benchmark", name, _ALLOWED)
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        missing = getattr(error, "name", None)
        if missing and not _is_part_of(missing, module_name):
            # The user's module was found; what it imports is not installed.
            raise ConfigError(
                f"Parameter `benchmark` should name a module whose imports work. Found "
                f"`benchmark = {name}`: {module_name} imports `{missing}`, which is not "
                f"installed ({type(error).__name__}: {error})."
            ) from None
        raise ConfigError(
            f"Parameter `benchmark` should name an importable module. Found `benchmark = "
            f"{name}` ({type(error).__name__}: {error}; run from the folder that holds it or "
            "install its package)."
        ) from None
    except Exception as error:  # the module's own code failed (a SyntaxError, a bug)
        raise ConfigError(
            f"Parameter `benchmark` should name a module that imports. Found `benchmark = "
            f"{name}`: importing {module_name} raised {_one_line(error)}."
        ) from None
    if not hasattr(module, attribute):
        raise ConfigError(
            f"Parameter `benchmark` should name a factory of module {module_name}. Found "
            f"`benchmark = {name}` ({module_name} has no attribute `{attribute}`)."
        )
    return module, getattr(module, attribute)


def _is_part_of(missing: str, module_name: str) -> bool:
    """Whether the module Python could not find is ``module_name`` or a package above it."""
    return module_name == missing or module_name.startswith(missing + ".")


def _one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def _source(name: str, module: Any, factory: Any, *, shipped: bool = False) -> ProblemSource:
    if not callable(factory):
        raise invalid("benchmark", name, "a callable factory returning a fm_optuna.Problem")
    parameters = inspect.signature(factory).parameters.values()
    # The shipped modules take **unknown only to reject typos in their own words.
    any_option = not shipped and any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)
    options = tuple(
        p.name
        for p in parameters
        if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        and p.name not in _FIXED
    )
    targets = getattr(module, "TARGETS", None)
    default = getattr(module, "DEFAULT_TARGET", None)
    return ProblemSource(
        name=name,
        factory=factory,
        targets=None if targets is None else tuple(targets),
        default_target=None if default is None else str(default),
        options=options,
        any_option=any_option,
        shipped=shipped,
        runtime_options=tuple(getattr(module, "RUNTIME_OPTIONS", ())),
    )


def resolve(name: str) -> ProblemSource:
    """The problem source ``name`` stands for; an unknown or unimportable one is a ConfigError.

    Shipped benchmarks come first, then installed plugins, then ``module.path:factory``.
    """
    if not isinstance(name, str) or not name.strip():
        raise invalid("benchmark", name, _ALLOWED)
    if name in _MODULES:
        module = importlib.import_module(_MODULES[name])
        return _source(name, module, module.build, shipped=True)
    installed = plugins()
    if name in installed:
        return _source(name, *_import(installed[name], name))
    if ":" in name:
        return _source(name, *_import(name, name))
    raise invalid("benchmark", name, _ALLOWED)


def targets(benchmark: str) -> tuple[str, ...]:
    """The targets a shipped benchmark (or a module declaring ``TARGETS``) allows; ``()`` when
    only the built problem knows."""
    return resolve(benchmark).targets or ()


def default_target(benchmark: str) -> str:
    source = resolve(benchmark)
    if source.default_target is None:
        raise invalid("target", None, f"given: problem {benchmark} declares no DEFAULT_TARGET")
    return source.default_target


def options(benchmark: str) -> tuple[str, ...]:
    """The benchmark-specific keyword options of its factory (e.g. ``batch_size``)."""
    return resolve(benchmark).options


def check_target(source: ProblemSource, target: str | None) -> None:
    """A target the module declares impossible fails before anything is built."""
    if target is not None and source.targets is not None and target not in source.targets:
        raise one_of("target", target, source.targets)


def _requires(factory: Callable[..., Any], name: str) -> bool:
    parameter = inspect.signature(factory).parameters.get(name)
    return parameter is not None and parameter.default is inspect.Parameter.empty


_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _expected_type(factory: Callable[..., Any], name: str) -> type | None:
    """The plain type (int, float, bool, str) a factory's option takes: its annotation, else
    its default's type; ``None`` when neither says."""
    import typing

    try:
        hints = typing.get_type_hints(factory)
    except Exception:  # annotations naming what cannot be imported here
        hints = {}
    hint = hints.get(name)
    if hint in _TYPE_NAMES:
        return hint
    parameter = inspect.signature(factory).parameters.get(name)
    if parameter is None or parameter.default is inspect.Parameter.empty:
        return None
    kind = type(parameter.default)
    return kind if kind in _TYPE_NAMES else None


def _check_option_types(source: ProblemSource, options: dict[str, Any]) -> None:
    """A problem option of the wrong type (``batch_size = "32"``) is one line naming
    ``problem.<key>`` and the value's type, before the factory sees it."""
    for key, value in options.items():
        expected = _expected_type(source.factory, key)
        if expected is None:
            continue
        ok = isinstance(value, expected) and (expected is bool or not isinstance(value, bool))
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if not ok:
            raise ConfigError(
                f"Parameter `problem.{key}` should be {_TYPE_NAMES[expected]}. Found "
                f"`problem.{key} = {value!r}` (a {type(value).__name__})."
            )


def build_problem(
    benchmark: str | ProblemSource,
    *,
    target: str | None = None,
    seed: int = 0,
    device: torch.device | None = None,
    check: bool = True,
    **extra: Any,
) -> Problem:
    """Build a problem by name and check it (:func:`~fm_optuna.problem.check_problem`).

    ``target=None`` means the module's ``DEFAULT_TARGET``, else the factory's own default.
    Unknown options, a target outside the problem's tasks or a problem that breaks the
    :class:`~fm_optuna.problem.Problem` contract raise :class:`ConfigError` before any training.
    """
    import torch

    from fm_optuna.problem._checks import check_problem
    from fm_optuna.problem._tasks import Problem

    source = benchmark if isinstance(benchmark, ProblemSource) else resolve(benchmark)
    for key in extra:
        if not source.accepts(key):
            raise ConfigError(
                f"Parameter `{key}` is not an option of the {source.name} benchmark; "
                f"its options are: {', '.join(source.options) or 'none'}."
            )
    target = target or source.default_target
    check_target(source, target)
    kwargs: dict[str, Any] = {"seed": seed, "device": device or torch.device("cpu"), **extra}
    if target is not None:
        kwargs["target"] = target
    elif _requires(source.factory, "target"):
        raise invalid("target", None, f"given: {source.name} has no DEFAULT_TARGET")
    try:
        inspect.signature(source.factory).bind(**kwargs)
    except TypeError as error:
        raise ConfigError(
            f"Problem factory {source.name} should accept keyword arguments "
            f"{', '.join(kwargs)} ({error})."
        ) from None
    _check_option_types(source, extra)
    try:
        problem = source.factory(**kwargs)
    except ConfigError:
        raise  # the factory's own one-line message about its options
    except Exception as error:  # the factory's own failure: one line naming it
        raise ConfigError(
            f"Problem factory {source.name} raised {_one_line(error)} (a factory reports a "
            "bad option by raising fm_optuna.ConfigError)."
        ) from None
    if not isinstance(problem, Problem):
        raise ConfigError(
            f"Problem factory {source.name} should return a fm_optuna.Problem. Found "
            f"{type(problem).__name__}."
        )
    if target is not None and getattr(problem, "target", None) != target:
        raise ConfigError(
            f"Problem {source.name}: asked for target `{target}`, the factory built one with "
            f"target `{getattr(problem, 'target', None)}`."
        )
    if check:
        check_problem(problem)
    return problem
