"""Benchmarks: one module per problem, registered by name.

Each module exposes ``TARGETS`` (the tasks that may be the target), ``DEFAULT_TARGET`` and
``build(*, target, seed, device, **options) -> Problem``. Adding a benchmark means adding a
module and one line to ``_MODULES``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from fm_optuna.errors import ConfigError, one_of

if TYPE_CHECKING:
    import torch

    from fm_optuna.tasks import Problem

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


def _module(benchmark: str) -> Any:
    if benchmark not in _MODULES:
        raise one_of("benchmark", benchmark, _MODULES)
    return importlib.import_module(_MODULES[benchmark])


def targets(benchmark: str) -> tuple[str, ...]:
    return tuple(_module(benchmark).TARGETS)


def default_target(benchmark: str) -> str:
    return str(_module(benchmark).DEFAULT_TARGET)


def options(benchmark: str) -> tuple[str, ...]:
    """The benchmark-specific keyword options of its ``build`` (e.g. ``batch_size``)."""
    import inspect

    parameters = inspect.signature(_module(benchmark).build).parameters.values()
    return tuple(
        p.name
        for p in parameters
        # ``**unknown`` catch-alls only exist to reject typos: they are not options.
        if p.name not in ("target", "seed", "device")
        and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
    )


def build_problem(
    benchmark: str,
    *,
    target: str | None = None,
    seed: int = 0,
    device: torch.device | None = None,
    **extra: Any,
) -> Problem:
    """Build a registered benchmark's problem; bad names raise :class:`ConfigError`."""
    import torch

    module = _module(benchmark)
    allowed = options(benchmark)
    for key in extra:
        if key not in allowed:
            raise ConfigError(
                f"Parameter `{key}` is not an option of the {benchmark} benchmark; "
                f"its options are: {', '.join(allowed)}."
            )
    target = target or module.DEFAULT_TARGET
    if target not in module.TARGETS:
        raise one_of("target", target, module.TARGETS)
    return module.build(target=target, seed=seed, device=device or torch.device("cpu"), **extra)
