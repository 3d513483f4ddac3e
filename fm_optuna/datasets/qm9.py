"""QM9 molecules as graphs: from qm9pack's bundled CSVs, or from PyG's raw files in a folder.

Two sources give the same :class:`MoleculeStore` (flat tensors with per-molecule offsets):

- :func:`qm9pack_molecules` parses the 130,831 molecules that ship inside ``qm9pack==1.0.3``
  (``qm9_part{1,2,3}.csv``, merged with ``qm9_polarizability.csv`` on ``XYZ_file``; the package
  itself does not import on new setuptools, so its CSVs are read directly). This is QM9 minus
  the 3,054 molecules that failed its consistency check, the same 130,831 as PyG's ``QM9``.
  Processing takes about a minute and is cached on disk once (see
  :func:`fm_optuna.benchmarks._images.cache_dir`); ``limit`` processes only the first molecules
  into a separate cache file (for tests).
- :func:`pyg_molecules` reads the paper's raw files (``root/raw/gdb9.sdf``, ``gdb9.sdf.csv``,
  ``uncharacterized.txt``) through ``torch_geometric.datasets.QM9``; the folder is checked first,
  so a missing file is a :class:`~fm_optuna.errors.ConfigError`, never a download.

Graphs. Atoms are nodes, with hydrogens. Node features are PyG's 11 QM9 features: one-hot element
(H, C, N, O, F), atomic number, aromatic, sp, sp2, sp3, number of bonded hydrogens. Edges are
covalent bonds in both directions with 5 features: one-hot bond type (single, double, triple,
aromatic) and the 3-D bond length in Å. qm9pack stores coordinates but no bonds, so bonds come from
rdkit's ``DetermineBonds`` on the XYZ block (connectivity and bond orders; it agrees with the
molecule's SMILES for ~99.9% of the ~94% where it succeeds). It fails for strained cages and
zwitterions, where the covalent-radius rule adds a spurious bond (e.g. across
bicyclo[1.1.1]pentane); those molecules take their bonds from the SMILES with explicit hydrogens,
matched onto the 3-D atoms by a substructure match on the (over-connected) distance graph, so
bond types and hybridisation are the SMILES's and every bond length is a real one. Molecules where
even that fails keep rdkit's ``DetermineConnectivity`` graph. :attr:`MoleculeStore.bond_source`
records which path each molecule took (:data:`BOND_SOURCES`).

Targets (:data:`TARGETS`, units in :data:`UNITS`), in PyG's units: μ in D, α in a₀³, ε_HOMO and
ε_LUMO in eV, ⟨R²⟩ in a₀², ZPVE in eV, c_v in cal/(mol K); U0, U, H and G are *atomisation*
energies in eV: the total energy minus the sum of the free atoms' energies of the same kind
(:data:`ATOM_REFERENCES`, QM9's ``atomref`` table, the values behind PyG's ``atomref``), times
27.211386246 eV/Ha. An atomisation energy differs from the total energy by a constant of the
composition, so an MAE is the same on either, but atomisation energies are well conditioned in
float32 (totals are ~ -11,000 eV). α is qm9pack's ``Polarizability_bohr3`` (the trace/3 of the
merged polarizability tensor agrees to 0.006 a₀³).
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

from fm_optuna.benchmarks._images import load_or_build
from fm_optuna.datasets._folder import require
from fm_optuna.errors import ConfigError, invalid

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "ATOM_REFERENCES",
    "BOND_SOURCES",
    "EDGE_FEATURES",
    "HARTREE_TO_EV",
    "NODE_FEATURES",
    "QM9PACK_SIZE",
    "RAW_FILES",
    "TARGETS",
    "UNITS",
    "GraphBatch",
    "GraphSet",
    "MoleculeStore",
    "load_qm9_raw",
    "process_qm9pack",
    "pyg_molecules",
    "qm9pack_molecules",
]

VERSION = "qm9-v1"
QM9PACK_SIZE = 130_831
HARTREE_TO_EV = 27.211386246
TARGETS: tuple[str, ...] = ("mu", "alpha", "homo", "lumo", "r2", "zpve", "u0", "u", "h", "g", "cv")
UNITS: dict[str, str] = {
    "mu": "D",
    "alpha": "a0^3",
    "homo": "eV",
    "lumo": "eV",
    "r2": "a0^2",
    "zpve": "eV",
    "u0": "eV",
    "u": "eV",
    "h": "eV",
    "g": "eV",
    "cv": "cal/(mol K)",
}
ELEMENTS: tuple[str, ...] = ("H", "C", "N", "O", "F")
ATOMIC_NUMBERS = {"H": 1, "C": 6, "N": 7, "O": 8, "F": 9}
#: Free-atom energies in Hartree for (U0, U at 298 K, H at 298 K, G at 298 K), from QM9's atomref.
ATOM_REFERENCES: dict[str, tuple[float, float, float, float]] = {
    "H": (-0.500273, -0.498857, -0.497912, -0.510927),
    "C": (-37.846772, -37.845355, -37.844411, -37.861317),
    "N": (-54.583861, -54.582445, -54.581501, -54.598897),
    "O": (-75.064579, -75.063163, -75.062219, -75.079532),
    "F": (-99.718730, -99.717314, -99.716370, -99.733544),
}
NODE_FEATURES = 11
EDGE_FEATURES = 5
BOND_SOURCES: tuple[str, ...] = ("determine_bonds", "smiles_match", "connectivity", "sdf")
RAW_FILES: tuple[str, ...] = ("raw/gdb9.sdf", "raw/gdb9.sdf.csv", "raw/uncharacterized.txt")

# qm9pack column of each target; energies in Hartree, the rest already in PyG's units.
_COLUMNS = {
    "mu": "Dipole_debye",
    "alpha": "Polarizability_bohr3",
    "homo": "HOMO_au",
    "lumo": "LUMO_au",
    "r2": "R2_bohr2",
    "zpve": "ZPVE_au",
    "u0": "InternalEnergy_0K_au",
    "u": "InternalEnergy_298K_au",
    "h": "Enthalphy_298K_au",
    "g": "GibbsFreeEnergy_298K_au",
    "cv": "Heatcapacity_Cv_cal_mol_K",
}
_HARTREE = ("homo", "lumo", "zpve")
_ATOMISATION = ("u0", "u", "h", "g")  # in ATOM_REFERENCES' order
# Columns of PyG's QM9 ``y`` for TARGETS (12–15 are its atomisation energies in eV).
_PYG_COLUMNS = (0, 1, 2, 3, 5, 6, 12, 13, 14, 15, 11)


# --------------------------------------------------------------------------------------------
# The store
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MoleculeStore:
    """Every molecule's graph in flat CPU tensors; molecule ``m`` owns rows ``ptr[m]:ptr[m+1]``.

    Attributes:
        x: ``uint8 [atoms, 11]`` node features (all small integers).
        pos: ``float32 [atoms, 3]`` coordinates in Å.
        edge_index: ``uint8 [2, edges]`` source and destination, local to the molecule (QM9
            molecules have at most 29 atoms).
        bond_type: ``uint8 [edges]``: 0 single, 1 double, 2 triple, 3 aromatic.
        distance: ``float32 [edges]`` bond length in Å.
        node_ptr: ``int64 [molecules + 1]`` atom offsets.
        edge_ptr: ``int64 [molecules + 1]`` edge offsets.
        y: ``float64 [molecules, 11]`` targets in :data:`UNITS`, columns in :data:`TARGETS` order.
        gdb_index: ``int64 [molecules]`` QM9's molecule number (1 to 133,885).
        bond_source: ``uint8 [molecules]`` index into :data:`BOND_SOURCES`.
    """

    x: torch.Tensor
    pos: torch.Tensor
    edge_index: torch.Tensor
    bond_type: torch.Tensor
    distance: torch.Tensor
    node_ptr: torch.Tensor
    edge_ptr: torch.Tensor
    y: torch.Tensor
    gdb_index: torch.Tensor
    bond_source: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> MoleculeStore:
        return cls(**{name: tensors[name] for name in cls.__dataclass_fields__})

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    def head(self, count: int) -> MoleculeStore:
        """The first ``count`` molecules (views, no copy)."""
        atoms, edges = int(self.node_ptr[count]), int(self.edge_ptr[count])
        return MoleculeStore(
            x=self.x[:atoms],
            pos=self.pos[:atoms],
            edge_index=self.edge_index[:, :edges],
            bond_type=self.bond_type[:edges],
            distance=self.distance[:edges],
            node_ptr=self.node_ptr[: count + 1],
            edge_ptr=self.edge_ptr[: count + 1],
            y=self.y[:count],
            gdb_index=self.gdb_index[:count],
            bond_source=self.bond_source[:count],
        )

    def graphs(self, molecules: torch.Tensor, device: torch.device) -> GraphSet:
        """The graphs of ``molecules`` (indices into this store) as a :class:`GraphSet`."""
        molecules = molecules.cpu().long()
        atoms = _ranges(self.node_ptr, molecules)
        edges = _ranges(self.edge_ptr, molecules)
        bond = torch.nn.functional.one_hot(self.bond_type[edges].long(), 4).float()
        edge_attr = torch.cat([bond, self.distance[edges].unsqueeze(1)], dim=1)
        return GraphSet(
            x=self.x[atoms].float().to(device),
            edge_index=self.edge_index[:, edges].long().to(device),
            edge_attr=edge_attr.to(device),
            node_count=(self.node_ptr[molecules + 1] - self.node_ptr[molecules]).to(device),
            edge_count=(self.edge_ptr[molecules + 1] - self.edge_ptr[molecules]).to(device),
        )


def _ranges(ptr: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """Concatenated ``arange(ptr[i], ptr[i+1])`` for every ``i`` in ``items``, vectorised."""
    start, count = ptr[items], ptr[items + 1] - ptr[items]
    offsets = torch.cumsum(count, 0) - count
    total = int(count.sum())
    return torch.repeat_interleave(start - offsets, count, output_size=total) + torch.arange(total)


class GraphBatch(NamedTuple):
    """A mini-batch of graphs as one disconnected graph (PyG's ``Batch`` without the overhead).

    ``edge_index`` indexes the batch's nodes; ``batch`` maps each node to its graph in
    ``0 .. num_graphs - 1``.
    """

    x: torch.Tensor
    edge_index: torch.Tensor
    edge_attr: torch.Tensor
    batch: torch.Tensor
    num_graphs: int


class GraphSet:
    """A fixed set of graphs on one device that yields :class:`GraphBatch` es by index.

    Drawing a batch is a handful of vectorised index operations (no Python loop over graphs), so
    it costs far less than ``Batch.from_data_list``.
    """

    def __init__(
        self,
        *,
        x: torch.Tensor,
        edge_index: torch.Tensor,
        edge_attr: torch.Tensor,
        node_count: torch.Tensor,
        edge_count: torch.Tensor,
    ) -> None:
        self.x = x
        self.edge_index = edge_index  # local to each graph
        self.edge_attr = edge_attr
        self.node_count = node_count
        self.edge_count = edge_count
        zero = torch.zeros(1, dtype=torch.long, device=x.device)
        self.node_ptr = torch.cat([zero, torch.cumsum(node_count, 0)])
        self.edge_ptr = torch.cat([zero, torch.cumsum(edge_count, 0)])

    def __len__(self) -> int:
        return len(self.node_count)

    def batch(self, graphs: torch.Tensor) -> GraphBatch:
        """The graphs at positions ``graphs`` (a long tensor on this set's device), in order."""
        device = self.x.device
        node_count, edge_count = self.node_count[graphs], self.edge_count[graphs]
        node_offset = torch.cumsum(node_count, 0) - node_count
        edge_offset = torch.cumsum(edge_count, 0) - edge_count
        # One synchronisation for both totals instead of two.
        n_nodes, n_edges = torch.stack([node_count.sum(), edge_count.sum()]).tolist()
        nodes = torch.repeat_interleave(
            self.node_ptr[graphs] - node_offset, node_count, output_size=n_nodes
        ) + torch.arange(n_nodes, device=device)
        edges = torch.repeat_interleave(
            self.edge_ptr[graphs] - edge_offset, edge_count, output_size=n_edges
        ) + torch.arange(n_edges, device=device)
        shift = torch.repeat_interleave(node_offset, edge_count, output_size=n_edges)
        return GraphBatch(
            x=self.x[nodes],
            edge_index=self.edge_index[:, edges] + shift,
            edge_attr=self.edge_attr[edges],
            batch=torch.repeat_interleave(
                torch.arange(len(graphs), device=device), node_count, output_size=n_nodes
            ),
            num_graphs=len(graphs),
        )

    def chunks(self, size: int) -> list[GraphBatch]:
        """Consecutive batches of at most ``size`` graphs covering the set in order."""
        device = self.x.device
        return [
            self.batch(torch.arange(start, min(start + size, len(self)), device=device))
            for start in range(0, len(self), size)
        ]


# --------------------------------------------------------------------------------------------
# qm9pack
# --------------------------------------------------------------------------------------------


def qm9pack_folder() -> Path:
    """The ``data/`` folder of the installed qm9pack (found without importing it)."""
    spec = importlib.util.find_spec("qm9pack")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        folder = Path(location) / "data"
        if (folder / "qm9_part1.csv").is_file():
            return folder
    raise ConfigError(
        "The QM9 benchmark needs the qm9pack package (its bundled CSVs): "
        "`pip install qm9pack==1.0.3`."
    )


def _read_qm9pack(limit: int | None) -> pd.DataFrame:
    import pandas as pd

    folder = qm9pack_folder()
    columns = ["XYZ_file", "Index", "SMILES", "Elements", "XYZ_Ang", *_COLUMNS.values()]
    frames = []
    remaining = limit
    for part in (1, 2, 3):
        if remaining is not None and remaining <= 0:
            break
        frame = pd.read_csv(folder / f"qm9_part{part}.csv", usecols=columns, nrows=remaining)
        frames.append(frame)
        if remaining is not None:
            remaining -= len(frame)
    molecules = pd.concat(frames, ignore_index=True)
    polarizability = pd.read_csv(folder / "qm9_polarizability.csv")
    # The merge checks that the files describe the same molecules; α itself is taken from
    # Polarizability_bohr3, which is the tensor's trace/3 up to rounding.
    merged = molecules.merge(polarizability, on="XYZ_file", how="left", validate="one_to_one")
    if merged["A_xx"].isna().any():
        raise RuntimeError("qm9_polarizability.csv lacks molecules of qm9_part*.csv")
    return merged


def _elements(text: str) -> list[str]:
    """``"['C','H']"`` → ``["C", "H"]`` (faster than ``ast.literal_eval`` on 130k strings)."""
    return [item.strip().strip("'\"") for item in text.strip()[1:-1].split(",")]


def _coordinates(text: str) -> list[list[float]]:
    try:
        return json.loads(text)
    except ValueError:
        # A few strings write numbers as ``0.``, which JSON rejects and Python accepts.
        return ast.literal_eval(text)


def _targets(frame: pd.DataFrame, elements: Sequence[Sequence[str]]) -> np.ndarray:
    counts = np.zeros((len(elements), len(ELEMENTS)), dtype=np.float64)
    column = {symbol: k for k, symbol in enumerate(ELEMENTS)}
    for m, symbols in enumerate(elements):
        for symbol in symbols:
            counts[m, column[symbol]] += 1
    y = np.stack([frame[_COLUMNS[name]].to_numpy(dtype=np.float64) for name in TARGETS], axis=1)
    for name in _HARTREE:
        y[:, TARGETS.index(name)] *= HARTREE_TO_EV
    references = np.array([ATOM_REFERENCES[symbol] for symbol in ELEMENTS])  # [5, 4]
    free_atoms = counts @ references  # [molecules, 4]
    for k, name in enumerate(_ATOMISATION):
        column_index = TARGETS.index(name)
        y[:, column_index] = (y[:, column_index] - free_atoms[:, k]) * HARTREE_TO_EV
    return y


class _Graph(NamedTuple):
    features: np.ndarray  # uint8 [atoms, 10]: everything but the hydrogen count
    edges: np.ndarray  # int64 [2, edges], both directions
    bond_type: np.ndarray  # uint8 [edges]
    source: int


@functools.cache
def _rdkit_codes() -> tuple[dict[object, tuple[int, int, int]], dict[object, int]]:
    """rdkit's hybridisation → (sp, sp2, sp3) flags and bond type → code, built once."""
    from rdkit.Chem.rdchem import BondType, HybridizationType

    hybridization = {
        HybridizationType.SP: (1, 0, 0),
        HybridizationType.SP2: (0, 1, 0),
        HybridizationType.SP3: (0, 0, 1),
    }
    bonds = {BondType.SINGLE: 0, BondType.DOUBLE: 1, BondType.TRIPLE: 2, BondType.AROMATIC: 3}
    return hybridization, bonds


_ONE_HOT = {symbol: tuple(int(symbol == e) for e in ELEMENTS) for symbol in ELEMENTS}


def _graph_of(mol: object, order: Sequence[int] | None, source: int) -> _Graph:
    """Features and bonds of ``mol``; ``order[i]`` is the 3-D atom of ``mol``'s atom ``i``."""
    hybridizations, bond_codes = _rdkit_codes()
    atoms = list(mol.GetAtoms())  # type: ignore[attr-defined]
    where = list(range(len(atoms))) if order is None else list(order)
    rows: list[tuple[int, ...]] = [()] * len(atoms)
    for atom, row in zip(atoms, where, strict=True):
        symbol = atom.GetSymbol()
        rows[row] = (
            *_ONE_HOT[symbol],
            ATOMIC_NUMBERS[symbol],
            int(atom.GetIsAromatic()),
            *hybridizations.get(atom.GetHybridization(), (0, 0, 0)),
        )
    features = np.array(rows, dtype=np.uint8).reshape(len(atoms), NODE_FEATURES - 1)
    pairs, codes = [], []
    for bond in mol.GetBonds():  # type: ignore[attr-defined]
        a, b = where[bond.GetBeginAtomIdx()], where[bond.GetEndAtomIdx()]
        code = bond_codes.get(bond.GetBondType(), 0)
        pairs += [(a, b), (b, a)]
        codes += [code, code]
    edges = np.array(pairs, dtype=np.int64).reshape(-1, 2).T
    return _Graph(features, edges, np.array(codes, dtype=np.uint8), source)


def _all_single(mol: object) -> object:
    """A copy with every bond single and no aromaticity or charge, for topology-only matching."""
    from rdkit import Chem

    plain = Chem.RWMol(mol)  # type: ignore[call-overload]
    for atom in plain.GetAtoms():
        atom.SetIsAromatic(False)
        atom.SetFormalCharge(0)
        atom.SetNoImplicit(True)
    for bond in plain.GetBonds():
        bond.SetBondType(Chem.BondType.SINGLE)
        bond.SetIsAromatic(False)
    return plain


def _molecule(elements: Sequence[str], coordinates: np.ndarray, smiles: str) -> _Graph:
    from rdkit import Chem
    from rdkit.Chem import rdDetermineBonds

    # Fixed-point coordinates: rdkit's XYZ reader rejects exponents such as ``-7.7e-05``.
    block = f"{len(elements)}\n\n" + "\n".join(
        f"{symbol} {x:.10f} {y:.10f} {z:.10f}"
        for symbol, (x, y, z) in zip(elements, coordinates, strict=True)
    )
    mol = Chem.MolFromXYZBlock(block)
    try:
        rdDetermineBonds.DetermineBonds(mol, charge=0)
        return _graph_of(mol, None, 0)
    except Exception:
        # rdkit signals a failed bond-order assignment with several exception types (valence,
        # charge, kekulisation errors); all of them send the molecule down the same fallback.
        pass
    connected = Chem.MolFromXYZBlock(block)
    rdDetermineBonds.DetermineConnectivity(connected)
    reference = Chem.AddHs(Chem.MolFromSmiles(smiles))
    if reference.GetNumAtoms() == len(elements):
        match = _all_single(connected).GetSubstructMatch(_all_single(reference))
        symbols_agree = match and all(
            elements[j] == reference.GetAtomWithIdx(i).GetSymbol() for i, j in enumerate(match)
        )
        if symbols_agree:
            return _graph_of(reference, match, 1)
    connected.UpdatePropertyCache(strict=False)
    return _graph_of(connected, None, 2)


def process_qm9pack(limit: int | None = None) -> dict[str, torch.Tensor]:
    """Parse qm9pack's CSVs into :class:`MoleculeStore` tensors (slow: ~1 min for all of QM9).

    Args:
        limit: Process only the first ``limit`` molecules (in qm9pack's order), or all.
    """
    from rdkit import RDLogger

    RDLogger.DisableLog("rdApp.*")  # bond perception failures are expected and handled
    frame = _read_qm9pack(limit)
    elements = [_elements(text) for text in frame["Elements"]]
    graphs: list[_Graph] = []
    positions: list[np.ndarray] = []
    for symbols, text, smiles in zip(elements, frame["XYZ_Ang"], frame["SMILES"], strict=True):
        coordinates = np.asarray(_coordinates(text), dtype=np.float64).reshape(-1, 3)
        graphs.append(_molecule(symbols, coordinates, smiles))
        positions.append(coordinates)
    node_count = np.array([len(g.features) for g in graphs], dtype=np.int64)
    edge_count = np.array([g.edges.shape[1] for g in graphs], dtype=np.int64)
    features = np.concatenate([g.features for g in graphs])
    edges = np.concatenate([g.edges for g in graphs], axis=1)
    pos = np.concatenate(positions)
    node_ptr = np.concatenate([[0], np.cumsum(node_count)])
    edge_ptr = np.concatenate([[0], np.cumsum(edge_count)])
    # Global atom index of each edge end, for lengths and hydrogen counts.
    base = np.repeat(node_ptr[:-1], edge_count)
    source, target = edges[0] + base, edges[1] + base
    distance = np.linalg.norm(pos[source] - pos[target], axis=1)
    is_hydrogen = features[:, 0].astype(np.int64)
    hydrogens = np.bincount(target, weights=is_hydrogen[source], minlength=len(features))
    x = np.concatenate([features, hydrogens.astype(np.uint8)[:, None]], axis=1)
    return {
        "x": torch.from_numpy(x),
        "pos": torch.from_numpy(pos.astype(np.float32)),
        "edge_index": torch.from_numpy(edges.astype(np.uint8)),
        "bond_type": torch.from_numpy(np.concatenate([g.bond_type for g in graphs])),
        "distance": torch.from_numpy(distance.astype(np.float32)),
        "node_ptr": torch.from_numpy(node_ptr),
        "edge_ptr": torch.from_numpy(edge_ptr),
        "y": torch.from_numpy(_targets(frame, elements)),
        "gdb_index": torch.from_numpy(frame["Index"].to_numpy(dtype=np.int64, copy=True)),
        "bond_source": torch.tensor([g.source for g in graphs], dtype=torch.uint8),
    }


@functools.lru_cache(maxsize=2)
def qm9pack_molecules(limit: int | None = None) -> MoleculeStore:
    """QM9 from qm9pack, processed once and cached on disk, then memoised in the process.

    Args:
        limit: Only the first ``limit`` molecules (a separate, much faster cache file), or all
            130,831.

    Example:
        >>> store = qm9pack_molecules(limit=100)  # doctest: +SKIP
        >>> len(store), store.y.shape
        (100, torch.Size([100, 11]))
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise invalid("limit", limit, "a positive integer or absent")
    if limit is not None and limit >= QM9PACK_SIZE:
        limit = None
    name = f"{VERSION}-{'all' if limit is None else f'first{limit}'}.pt"
    return MoleculeStore.from_tensors(load_or_build(name, lambda: process_qm9pack(limit)))


# --------------------------------------------------------------------------------------------
# PyG's raw files
# --------------------------------------------------------------------------------------------


def load_qm9_raw(root: str | Path) -> object:
    """``torch_geometric.datasets.QM9(root)`` after checking that the raw files are there.

    PyG downloads whenever ``root/raw`` lacks a file; checking first turns a wrong path into a
    :class:`ConfigError` that lists the expected files. The first call processes the raw files
    into ``root/processed`` (minutes for the full set); later calls load that.

    Args:
        root: A folder with ``raw/gdb9.sdf``, ``raw/gdb9.sdf.csv`` and ``raw/uncharacterized.txt``.

    Returns:
        The PyG ``QM9`` dataset (19 targets in PyG's units).
    """
    path = require("QM9 (PyG raw files)", root, RAW_FILES)
    if importlib.util.find_spec("rdkit") is None:
        # Without rdkit PyG looks for a different raw file and would try to download it.
        raise ConfigError("Reading QM9's raw files needs rdkit: `pip install rdkit`.")
    with warnings.catch_warnings():
        # Importing torch_geometric runs torch.jit.script, which this torch deprecates with a
        # FutureWarning; under ``-W error`` that warning would abort the import.
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script", category=FutureWarning)
        from torch_geometric.datasets import QM9

    return QM9(str(path))


def pyg_molecules(root: str | Path, limit: int | None = None) -> MoleculeStore:
    """The molecules of PyG's QM9 in ``root`` as a :class:`MoleculeStore` (same features).

    PyG's node features and bond types are the ones used here; bond lengths come from its
    coordinates, and the targets are PyG's columns for :data:`TARGETS` (atomisation energies for
    U0, U, H and G), so both sources feed the same benchmark.
    """
    dataset = load_qm9_raw(root)
    # InMemoryDataset keeps every graph in one collated Data with per-graph slices and local
    # edge indices: the store's layout, so no per-graph loop is needed.
    data, slices = dataset._data, dataset.slices  # type: ignore[attr-defined]
    count = len(slices["y"]) - 1
    if limit is not None:
        count = min(count, limit)
    node_ptr = slices["x"][: count + 1].long()
    edge_ptr = slices["edge_index"][: count + 1].long()
    atoms, edges = int(node_ptr[-1]), int(edge_ptr[-1])
    pos = data.pos[:atoms].float()
    edge_index = data.edge_index[:, :edges]
    base = torch.repeat_interleave(node_ptr[:-1], edge_ptr[1:] - edge_ptr[:-1])
    distance = (pos[edge_index[0] + base] - pos[edge_index[1] + base]).norm(dim=1)
    idx = data.idx[:count] if "idx" in slices else torch.arange(count)
    return MoleculeStore(
        x=data.x[:atoms, :NODE_FEATURES].round().to(torch.uint8),
        pos=pos,
        edge_index=edge_index.to(torch.uint8),
        bond_type=data.edge_attr[:edges, :4].argmax(dim=1).to(torch.uint8),
        distance=distance,
        node_ptr=node_ptr,
        edge_ptr=edge_ptr,
        y=data.y[:count, list(_PYG_COLUMNS)].double(),
        gdb_index=idx.long() + 1,
        bond_source=torch.full((count,), BOND_SOURCES.index("sdf"), dtype=torch.uint8),
    )
