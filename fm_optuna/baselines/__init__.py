"""Comparison methods on the same training loop, one small file each, registered by name.

A baseline is an :class:`~fm_optuna.baselines.base.Baseline`: it says which update rule trains
the model at each step; :func:`~fm_optuna.baselines.base.run_baseline` does the rest.

=============  ===============  ====================================================================
name           kind             method
=============  ===============  ====================================================================
stl            single-task      the target alone (the reference of TG and Δm)
ew             multi-task       Σ_k L_k
uw             multi-task       uncertainty weighting (Kendall et al., 2018), torchjd ``UW``
dwa            multi-task       dynamic weight average (Liu et al., 2019), torchjd ``DWA``
rlw            multi-task       random loss weighting (Lin et al., 2022)
si             multi-task       scale-invariant Σ_k log L_k (the ForkMerge paper's SI)
gradnorm       multi-task       GradNorm (Chen et al., 2018): weights that balance gradient norms on
                                the last shared layer, toward equal relative training rates (α)
mgda           multi-task       torchjd ``MGDA`` on the shared parameters
pcgrad         multi-task       torchjd ``PCGrad``
cagrad         multi-task       torchjd ``CAGrad`` (cvxpy + Clarabel)
imtl           multi-task       torchjd ``IMTLG`` (IMTL-G)
gradvac        multi-task       torchjd ``GradVac``
nashmtl        multi-task       torchjd ``NashMTL`` (cvxpy + ECOS)
itmtl          multi-task       IT-MTL (Fifty et al., 2021, Alg. 1): per step, the candidate with
                                the most lookahead transference (Eq. 2) among each task alone, Σ
itmtl-fo       multi-task       IT-MTL‡: the same candidates scored to first order (Section 4.1)
it-pcgrad      multi-task       IT-PCGrad: candidates Σ and PCGrad (the paper's "-PCGrad" set)
it-uw-pcgrad   multi-task       IT-UW-PCGrad: the same on UW-weighted task gradients
ptft           target-specific  pre-train on all tasks, then fine-tune on the target
gcs            target-specific  gradient cosine similarity (Du et al., 2018)
autol          target-specific  Auto-λ (Liu et al., 2022), one-step lookahead on the target
=============  ===============  ====================================================================
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields, is_dataclass

from fm_optuna.baselines.autol import AutoLambda
from fm_optuna.baselines.base import KINDS, Baseline, run_baseline
from fm_optuna.baselines.cagrad import CaGrad
from fm_optuna.baselines.dwa import DynamicWeightAverage
from fm_optuna.baselines.ew import EqualWeighting
from fm_optuna.baselines.gcs import GradientCosineSimilarity
from fm_optuna.baselines.gradnorm import GradNorm
from fm_optuna.baselines.gradvac import GradVaccine
from fm_optuna.baselines.imtl import ImtlG
from fm_optuna.baselines.itmtl import (
    IncreasedTransfer,
    IncreasedTransferFirstOrder,
    IncreasedTransferPcGrad,
    IncreasedTransferUwPcGrad,
)
from fm_optuna.baselines.mgda import Mgda
from fm_optuna.baselines.nashmtl import NashMtl
from fm_optuna.baselines.pcgrad import PcGrad
from fm_optuna.baselines.ptft import PretrainFinetune
from fm_optuna.baselines.rlw import RandomLossWeighting
from fm_optuna.baselines.si import ScaleInvariant
from fm_optuna.baselines.stl import SingleTask
from fm_optuna.baselines.uw import UncertaintyWeighting
from fm_optuna.errors import invalid, one_of

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
        ScaleInvariant,
        GradNorm,
        IncreasedTransfer,
        IncreasedTransferFirstOrder,
        IncreasedTransferPcGrad,
        IncreasedTransferUwPcGrad,
        PretrainFinetune,
        GradientCosineSimilarity,
        AutoLambda,
    )
}


def make_baseline(name: str, options: Mapping[str, object] | None = None) -> Baseline:
    """The registered baseline ``name``, with ``options`` (its dataclass fields) over its defaults.

    Example:
        >>> make_baseline("itmtl", {"candidates": ["ew", "pcgrad"]}).candidates
        ('ew', 'pcgrad')
    """
    if name not in BASELINES:
        raise one_of("method", name, BASELINES)
    cls = BASELINES[name]
    allowed = [f.name for f in fields(cls)] if is_dataclass(cls) else []
    for key, value in (options or {}).items():
        if key not in allowed:
            if not allowed:
                raise invalid(f"{name}.{key}", value, f"absent: {name} takes no options")
            raise one_of(f"{name}.{key}", key, allowed)
    return cls(**(options or {}))


__all__ = [
    "BASELINES",
    "KINDS",
    "AutoLambda",
    "Baseline",
    "CaGrad",
    "DynamicWeightAverage",
    "EqualWeighting",
    "GradNorm",
    "GradVaccine",
    "GradientCosineSimilarity",
    "ImtlG",
    "IncreasedTransfer",
    "IncreasedTransferFirstOrder",
    "IncreasedTransferPcGrad",
    "IncreasedTransferUwPcGrad",
    "Mgda",
    "NashMtl",
    "PcGrad",
    "PretrainFinetune",
    "RandomLossWeighting",
    "ScaleInvariant",
    "SingleTask",
    "UncertaintyWeighting",
    "make_baseline",
    "run_baseline",
]
