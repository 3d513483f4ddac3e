"""The outer Optuna study over Δt, L, …: the tuner, its pruner and distinct-parameters sampler,
storages, study files (specs) and the baselines a shared study trains once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fm_optuna._lazy import lazy_face

if TYPE_CHECKING:
    from fm_optuna.study._sampler import DistinctSampler
    from fm_optuna.study._shared_baselines import SharedBaselines
    from fm_optuna.study._spec import StudySpec, load_spec, parse_space
    from fm_optuna.study._tuner import MedianPruner, Tuner, TuneReport, open_storage

_WHERE = {
    "DistinctSampler": "_sampler",
    "MedianPruner": "_tuner",
    "SharedBaselines": "_shared_baselines",
    "StudySpec": "_spec",
    "TuneReport": "_tuner",
    "Tuner": "_tuner",
    "load_spec": "_spec",
    "open_storage": "_tuner",
    "parse_space": "_spec",
}
__all__ = [
    "DistinctSampler",
    "MedianPruner",
    "SharedBaselines",
    "StudySpec",
    "TuneReport",
    "Tuner",
    "load_spec",
    "open_storage",
    "parse_space",
]
__getattr__, __dir__ = lazy_face(__name__, _WHERE, __all__)
