"""What a study was trained with: its configuration record, a short fingerprint of it, and the
versions a study has gone through.

A trial's outcome depends on the problem (benchmark, target, options), the training and search
configuration it starts from, the searched space and the seed; the outer sampler and pruner, the
number of trials, the stores, heartbeats, retries, checkpoints and the baselines list do not
change what a trial trains. The record is that set as a flat ``{"training.optimizer": "adam",
...}`` mapping, keyed as a study file names the options; it is kept in the Optuna study's user
attributes (``config:v1``, ``config:v2``, ... and ``config_version``, the current one), so an
invocation whose spec trains differently is refused before it trains or writes anything, unless
it asks to continue on purpose: then the record gains a version, and the trials trained after
the change are tagged with it (trial user attribute ``config_version``).

Example:
    >>> old = {"training.optimizer": "adamw", "training.momentum": 0.0}
    >>> differences(old, {"training.optimizer": "sgd", "training.momentum": 0.9})
    ['training.optimizer adamw → sgd', 'training.momentum 0 → 0.9']
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

from fm_optuna.config import ForkMergeConfig, StudyOptions, schema
from fm_optuna.errors import ConfigError
from fm_optuna.tracking.uris import mask_uri

if TYPE_CHECKING:
    from fm_optuna.study._spec import StudySpec

#: Study user attributes: the current version, and each version's entry under its number.
VERSION_ATTR = "config_version"
ENTRY_PREFIX = "config:v"
#: Trial user attributes: the configuration version (and its fingerprint) it was trained with.
TRIAL_VERSION_ATTR = "config_version"
TRIAL_FINGERPRINT_ATTR = "config_fingerprint"

#: The record's sections, in the order a study file reads.
_ORDER = ("problem", "study", "training", "search", "space")
#: Changes listed in a refusal before "and n more".
_SHOWN = 6


def configuration_record(
    spec: StudySpec, config: ForkMergeConfig | None = None, *, target: str | None = None
) -> dict[str, Any]:
    """Everything that changes what a trial of ``spec``'s study trains, as a flat JSON mapping.

    Args:
        spec: The study specification (its ``[problem]`` and ``[space]``).
        config: The configuration every trial starts from (default: ``spec.config()``); the
            fields the space searches are left out, the space's ranges stand for them.
        target: The problem's resolved target (default: the spec's, which may be unset).
    """
    config = config or spec.config()
    record: dict[str, Any] = {
        "problem.benchmark": spec.problem.benchmark,
        "problem.target": target or spec.problem.target,
    }
    # Stored in the study's user attributes: a credential in an option is kept masked.
    runtime = _runtime_options(spec.problem.benchmark)
    options = {
        k: mask_uri(v) if isinstance(v, str) else v
        for k, v in spec.problem.options.items()
        if k not in runtime
    }
    record.update(_flat("problem", options))
    searched = {f.name for f in fields(spec.space) if getattr(spec.space, f.name) is not None}
    params = config.as_params()
    for entry in schema(ForkMergeConfig):  # its study-file key, and whether it changes a trial
        if entry.option.fingerprint and entry.name not in searched:
            record[entry.dotted] = _json(params[entry.name])
    record.update(_flat("space", {k: v for k, v in asdict(spec.space).items() if v is not None}))
    return dict(sorted(record.items(), key=lambda item: _ORDER.index(item[0].split(".")[0])))


def _runtime_options(benchmark: str) -> tuple[str, ...]:
    """The benchmark's options that do not change what it trains (e.g. decoding ``workers``)."""
    from fm_optuna.benchmarks import resolve

    try:
        return resolve(benchmark).runtime_options
    except ConfigError:  # reported where the problem is built; the record keeps every option
        return ()


def fingerprint(record: Mapping[str, Any]) -> str:
    """A short, stable hash of a configuration record (the order of its keys does not count).

    Example:
        >>> fingerprint({"a": 1, "b": 2}) == fingerprint({"b": 2, "a": 1})
        True
    """
    text = json.dumps(record, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``key old → new`` for every key whose value differs, in ``new``'s order, then the keys
    only ``old`` has. A key only one side has is ``unset`` on the other, unless its value is the
    study-file default (an option added to, or removed from, fm-optuna since the record was
    written, left at its default, trains as before)."""
    changes = []
    for key in [*new, *(k for k in old if k not in new)]:
        if key in old and key in new:
            if old[key] != new[key]:
                changes.append(f"{key} {_shown(old[key])} → {_shown(new[key])}")
            continue
        value = new[key] if key in new else old[key]
        default = _defaults().get(key, _MISSING)
        if default is not _MISSING and default == value:
            continue
        if key in new:
            changes.append(f"{key} unset → {_shown(value)}")
        else:
            changes.append(f"{key} {_shown(value)} → unset")
    return changes


@dataclass(frozen=True)
class Version:
    """One recorded configuration of a study."""

    number: int
    fingerprint: str
    record: dict[str, Any]
    first_trial: int = 0  # the number of trials the study had when this version began
    adopted: bool = False  # recorded for a study made before studies recorded their config

    def entry(self) -> dict[str, Any]:
        """The JSON value kept in the study's user attribute ``config:v<number>``."""
        return {
            "fingerprint": self.fingerprint,
            "record": self.record,
            "first_trial": self.first_trial,
            "adopted": self.adopted,
        }


def current_version(user_attrs: Mapping[str, Any]) -> Version | None:
    """The study's current configuration (``None``: the study has not recorded one)."""
    number = user_attrs.get(VERSION_ATTR)
    entry = user_attrs.get(f"{ENTRY_PREFIX}{number}")
    if not isinstance(number, int) or not isinstance(entry, Mapping):
        return None
    return Version(
        number,
        str(entry["fingerprint"]),
        dict(entry["record"]),
        int(entry.get("first_trial", 0)),
        bool(entry.get("adopted", False)),
    )


@dataclass(frozen=True)
class Settlement:
    """What an invocation's configuration means for a study: the version its trials belong to,
    the user attributes to write first (a new version), and what changed."""

    version: Version
    write: dict[str, Any] = field(default_factory=dict)
    changes: tuple[str, ...] = ()
    refused: bool = False


def settle(
    user_attrs: Mapping[str, Any],
    record: dict[str, Any],
    *,
    allow_change: bool,
    n_trials: int,
) -> Settlement:
    """Compare ``record`` with the study's current configuration.

    A study that has recorded none gets ``record`` as version 1 (adopted when it already has
    trials); the same configuration keeps its version (and fingerprint); a different one is
    refused, or with ``allow_change`` becomes the next version.
    """
    current = current_version(user_attrs)
    if current is None:
        return _new_version(1, record, n_trials, adopted=n_trials > 0)
    changes = tuple(differences(current.record, record))
    if not changes:
        return Settlement(current)
    if not allow_change:
        return Settlement(current, changes=changes, refused=True)
    return _new_version(current.number + 1, record, n_trials, changes=changes)


def _new_version(
    number: int,
    record: dict[str, Any],
    n_trials: int,
    *,
    adopted: bool = False,
    changes: tuple[str, ...] = (),
) -> Settlement:
    version = Version(number, fingerprint(record), record, n_trials, adopted)
    # The entry first: a reader that sees the new number finds its entry.
    write = {f"{ENTRY_PREFIX}{number}": version.entry(), VERSION_ATTR: number}
    return Settlement(version, write, changes)


def refusal(
    where: object, study_name: str, settlement: Settlement, *, override: str
) -> ConfigError:
    """The one line refusing to continue ``study_name`` with a changed configuration."""
    changes = list(settlement.changes[:_SHOWN])
    if len(settlement.changes) > _SHOWN:
        changes.append(f"and {len(settlement.changes) - _SHOWN} more")
    number = settlement.version.number
    made = "created" if number == 1 else f"continued (configuration version {number})"
    return ConfigError(
        f"{where}: study `{study_name}` was {made} with a different configuration: "
        f"{', '.join(changes)}. Use a new study name, or pass {override} to continue it on "
        "purpose (trials trained after the change are tagged)."
    )


_MISSING = object()


@functools.cache
def _defaults() -> dict[str, Any]:
    """The record of a study file that sets nothing but its name."""
    from fm_optuna.study._spec import ProblemSection, SpaceSection, StudySpec

    spec = StudySpec("", StudyOptions(), ProblemSection(), ForkMergeConfig(), SpaceSection())
    return configuration_record(spec)


def _flat(prefix: str, table: Mapping[str, Any]) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, Mapping):
            flat.update(_flat(f"{prefix}.{key}", value))
        else:
            flat[f"{prefix}.{key}"] = _json(value)
    return flat


def _json(value: Any) -> Any:
    """``value`` as JSON keeps it: a tuple as a list, anything unknown by its text."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return [_json(item) for item in value]
    return str(value)


def _shown(value: Any) -> str:
    """A value as a study file would write it (``0.9``, ``true``, ``[2, 3]``)."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, float):
        short = f"{value:g}"
        return short if float(short) == value else repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_shown(item) for item in value) + "]"
    return str(value)
