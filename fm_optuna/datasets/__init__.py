"""The paper's data sets read from a local folder in their published layouts, and QM9 graphs.

Nothing here downloads: each loader checks its folder first and raises one
:class:`~fm_optuna.errors.ConfigError` that lists the expected layout when something is missing.

- :mod:`~fm_optuna.datasets.qm9`: QM9 graphs from qm9pack's bundled CSVs or PyG's raw files.
- :mod:`~fm_optuna.datasets.nyuv2`: NYUv2 in MTAN's ``.npy`` layout, and a DeepLab-style net.
- :mod:`~fm_optuna.datasets.domainnet`: DomainNet image folders and lists, and a ResNet-18.
- :mod:`~fm_optuna.datasets.aliexpress`: AliExpress CSVs (MTReclib layout).
- :mod:`~fm_optuna.datasets.ctr`: the shared-bottom/ESMM model and a rank-based AUC.

Model code imports torchvision lazily, so importing this package stays cheap.
"""

from __future__ import annotations

from fm_optuna.datasets.aliexpress import (
    COUNTRIES,
    CTRTable,
    field_dims,
    load_aliexpress,
)
from fm_optuna.datasets.ctr import SharedBottom, auc
from fm_optuna.datasets.domainnet import DomainNet, DomainNetNet
from fm_optuna.datasets.nyuv2 import NYUv2, NYUv2Net, nyuv2_losses
from fm_optuna.datasets.qm9 import (
    GraphBatch,
    GraphSet,
    MoleculeStore,
    load_qm9_raw,
    pyg_molecules,
    qm9pack_molecules,
)

__all__ = [
    "COUNTRIES",
    "CTRTable",
    "DomainNet",
    "DomainNetNet",
    "GraphBatch",
    "GraphSet",
    "MoleculeStore",
    "NYUv2",
    "NYUv2Net",
    "SharedBottom",
    "auc",
    "field_dims",
    "load_aliexpress",
    "load_qm9_raw",
    "nyuv2_losses",
    "pyg_molecules",
    "qm9pack_molecules",
]
