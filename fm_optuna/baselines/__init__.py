"""Comparison methods on the same training loop, one small file each, registered by name.

A baseline is an :class:`~fm_optuna.baselines.base.Baseline`: it says which update rule trains
the model at each step; :func:`~fm_optuna.baselines.base.run_baseline` does the rest.

========  =================  =====================================================================
name      kind               method
========  =================  =====================================================================
stl       single-task        the target alone (the reference of TG and Δm)
ew        multi-task         Σ_k L_k
uw        multi-task         uncertainty weighting (Kendall et al., 2018), torchjd ``UW``
dwa       multi-task         dynamic weight average (Liu et al., 2019), torchjd ``DWA``
rlw       multi-task         random loss weighting (Lin et al., 2022)
mgda      multi-task         torchjd ``MGDA`` on the shared parameters
pcgrad    multi-task         torchjd ``PCGrad``
cagrad    multi-task         torchjd ``CAGrad`` (cvxpy + Clarabel)
imtl      multi-task         torchjd ``IMTLG`` (IMTL-G)
gradvac   multi-task         torchjd ``GradVac``
nashmtl   multi-task         torchjd ``NashMTL`` (cvxpy + ECOS)
ptft      target-specific    pre-train on all tasks, then fine-tune on the target
gcs       target-specific    gradient cosine similarity (Du et al., 2018)
autol     target-specific    Auto-λ (Liu et al., 2022), one-step lookahead on the target
========  =================  =====================================================================
"""

from __future__ import annotations

from fm_optuna.baselines.autol import AutoLambda
from fm_optuna.baselines.base import KINDS, Baseline, run_baseline
from fm_optuna.baselines.cagrad import CaGrad
from fm_optuna.baselines.dwa import DynamicWeightAverage
from fm_optuna.baselines.ew import EqualWeighting
from fm_optuna.baselines.gcs import GradientCosineSimilarity
from fm_optuna.baselines.gradvac import GradVaccine
from fm_optuna.baselines.imtl import ImtlG
from fm_optuna.baselines.mgda import Mgda
from fm_optuna.baselines.nashmtl import NashMtl
from fm_optuna.baselines.pcgrad import PcGrad
from fm_optuna.baselines.ptft import PretrainFinetune
from fm_optuna.baselines.rlw import RandomLossWeighting
from fm_optuna.baselines.stl import SingleTask
from fm_optuna.baselines.uw import UncertaintyWeighting
from fm_optuna.errors import one_of

BASELINES: dict[str, type[Baseline]] = {
    cls.name: cls
    for cls in (
        SingleTask,
        EqualWeighting,
        UncertaintyWeighting,
        DynamicWeightAverage,
        RandomLossWeighting,
        Mgda,
        PcGrad,
        CaGrad,
        ImtlG,
        GradVaccine,
        NashMtl,
        PretrainFinetune,
        GradientCosineSimilarity,
        AutoLambda,
    )
}


def make_baseline(name: str) -> Baseline:
    """The registered baseline ``name`` with its default options."""
    if name not in BASELINES:
        raise one_of("method", name, BASELINES)
    return BASELINES[name]()


__all__ = [
    "BASELINES",
    "KINDS",
    "AutoLambda",
    "Baseline",
    "CaGrad",
    "DynamicWeightAverage",
    "EqualWeighting",
    "GradVaccine",
    "GradientCosineSimilarity",
    "ImtlG",
    "Mgda",
    "NashMtl",
    "PcGrad",
    "PretrainFinetune",
    "RandomLossWeighting",
    "SingleTask",
    "UncertaintyWeighting",
    "make_baseline",
    "run_baseline",
]
