"""QM9: eleven molecular properties predicted from one shared message-passing network.

The paper's QM9 setting (Jiang et al., 2023, after Navon et al.'s Nash-MTL): 11 regression targets
μ, α, ε_HOMO, ε_LUMO, ⟨R²⟩, ZPVE, U0, U, H, G, c_v (:data:`TARGETS`), each normalised to zero
mean and unit variance with *training-split* statistics, trained with the mean squared error on
the normalised scale, and scored by the mean absolute error in the original units (PyG's units:
eV for energies; U0, U, H and G are atomisation energies, see :mod:`fm_optuna.datasets.qm9`).
Lower MAE is better.

Data. All 130,831 molecules of QM9 ship inside ``qm9pack``; they are turned into graphs once and
cached on disk (:func:`fm_optuna.datasets.qm9.qm9pack_molecules`). With ``data_dir`` the
molecules come from PyG's raw QM9 files in that folder instead. A random permutation fixed by
``data_seed`` is laid out as ``[test | val | train]`` with ``subset_test``, ``subset_val`` and
``subset_train`` molecules, so changing the training size never changes the evaluation sets.
``limit`` restricts the pool to the first molecules of the source (a small, fast cache for tests).

Model (:class:`MPNN`). Gilmer et al.'s MPNN as in PyG's ``examples/qm9_nn_conv.py``: an input
layer, three rounds of an edge-network convolution (``NNConv`` with mean aggregation) whose output
updates node states through a GRU, a Set2Set readout (3 steps) and a hidden layer, then one linear
head per target on the shared trunk. Two deliberate differences, both for a 2-core CPU:

- Edges are the covalent bonds (with bond type and 3-D bond length as edge features) rather than
  the complete graph: ~2 directed edges per atom instead of ~17, which is what the edge network's
  per-edge ``hidden × hidden`` matrices cost.
- The edge network has ``edge_hidden = 8`` hidden units instead of 128. Its last layer maps them
  to a ``hidden × hidden`` matrix per edge, so its rank — and the cost of every message-passing
  round — grows with ``edge_hidden``. One 64-molecule step on one CPU thread costs ~45 ms at 8
  (~90 ms while the cores are shared with other work; ~130 ms at 16 and ~300 ms at 32 then), and
  a validation pass over 2,000 molecules ~0.8 s; ``hidden=32`` cuts both by about 3×.

The convolution is computed without materialising the per-edge matrices (see
:meth:`MPNN._basis`; the same function as PyG's ``NNConv``, checked against it in the tests), and
the layers are written in plain torch: importing ``torch_geometric.nn`` emits a ``FutureWarning``
that ``-W error`` turns into an error, and a hand-rolled batch gather
(:class:`fm_optuna.datasets.qm9.GraphSet`, ~0.5 ms for 64 molecules) is much cheaper than
``Batch.from_data_list``.

All tasks share their inputs: one batch of molecules per step serves every requested task.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn import functional as F

from fm_optuna.benchmarks._images import check_non_negative, check_positive, eval_mode
from fm_optuna.datasets import qm9 as qm9_data
from fm_optuna.datasets.qm9 import EDGE_FEATURES, NODE_FEATURES, GraphBatch, MoleculeStore
from fm_optuna.errors import invalid, one_of
from fm_optuna.problem._tasks import Problem, Split, Task, TaskMetrics

if TYPE_CHECKING:
    from fm_optuna.datasets.qm9 import GraphSet

__all__ = ["DEFAULT_TARGET", "MPNN", "TARGETS", "UNITS", "QM9Problem", "Set2Set", "build"]

TARGETS: tuple[str, ...] = qm9_data.TARGETS
UNITS = qm9_data.UNITS
DEFAULT_TARGET = "mu"
# Graphs per evaluation forward: large enough to amortise Python overhead, small enough that the
# per-edge matrices (edges × hidden²) stay around a hundred megabytes.
EVAL_CHUNK = 500


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


def _segment_softmax(scores: torch.Tensor, index: torch.Tensor, count: int) -> torch.Tensor:
    """Softmax of ``scores [n]`` within each group ``index [n]`` of ``count`` groups."""
    top = torch.full((count,), float("-inf"), dtype=scores.dtype, device=scores.device)
    top = top.scatter_reduce(0, index, scores, reduce="amax", include_self=True)
    weights = (scores - top[index]).exp()
    total = torch.zeros(count, dtype=scores.dtype, device=scores.device).index_add_(
        0, index, weights
    )
    return weights / total[index]


class Set2Set(nn.Module):
    """Set2Set readout (Vinyals et al., 2016) as in PyG: an LSTM query attends over each graph.

    Returns ``[num_graphs, 2 × channels]``: the last query and its attention-weighted read.
    """

    def __init__(self, channels: int, steps: int) -> None:
        super().__init__()
        self.channels = channels
        self.steps = steps
        self.lstm = nn.LSTM(2 * channels, channels)

    def forward(self, x: torch.Tensor, batch: torch.Tensor, num_graphs: int) -> torch.Tensor:
        state = (
            x.new_zeros(1, num_graphs, self.channels),
            x.new_zeros(1, num_graphs, self.channels),
        )
        q_star = x.new_zeros(num_graphs, 2 * self.channels)
        for _ in range(self.steps):
            q, state = self.lstm(q_star.unsqueeze(0), state)
            q = q.view(num_graphs, self.channels)
            attention = _segment_softmax((x * q[batch]).sum(dim=-1), batch, num_graphs)
            read = x.new_zeros(num_graphs, self.channels).index_add_(
                0, batch, attention.unsqueeze(-1) * x
            )
            q_star = torch.cat([q, read], dim=-1)
        return q_star


class MPNN(nn.Module):
    """Gilmer et al.'s MPNN (edge network + GRU + Set2Set) with one linear head per task.

    Args:
        tasks: Names of the heads.
        hidden: Node state size (64 in PyG's example).
        steps: Message-passing rounds (3).
        edge_hidden: Hidden units of the edge network that maps edge features to a
            ``hidden × hidden`` matrix per edge (128 in PyG's example; smaller is cheaper).
    """

    def __init__(
        self, tasks: Sequence[str], *, hidden: int = 64, steps: int = 3, edge_hidden: int = 8
    ) -> None:
        super().__init__()
        self.hidden = hidden
        self.steps = steps
        self.embed = nn.Linear(NODE_FEATURES, hidden)
        self.edge_network = nn.Sequential(
            nn.Linear(EDGE_FEATURES, edge_hidden), nn.ReLU(), nn.Linear(edge_hidden, hidden**2)
        )
        # NNConv's root weight and bias: x_i W + b added to the mean of the messages.
        self.root = nn.Linear(hidden, hidden)
        self.gru = nn.GRUCell(hidden, hidden)
        self.readout = Set2Set(hidden, steps=3)
        self.trunk_out = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.ReLU())
        self.heads = nn.ModuleDict({task: nn.Linear(hidden, 1) for task in tasks})

    def _basis(self) -> torch.Tensor:
        """The edge network's last layer as ``edge_hidden + 1`` stacked ``hidden × hidden`` blocks.

        NNConv's per-edge matrix is ``W_e = reshape(A a_e + b)`` with ``a_e`` the edge network's
        hidden layer, so the mean message into node ``i`` is
        ``Σ_k (mean_{j→i} a_ek x_j) A_k + (mean_{j→i} x_j) B``: mixing the *inputs* per edge and
        multiplying once per node is the same function as materialising one matrix per edge, at a
        fraction of the cost (no ``edges × hidden²`` tensor).
        """
        last = self.edge_network[-1]
        d, k = self.hidden, last.in_features
        blocks = last.weight.view(d, d, k).permute(2, 0, 1).reshape(k * d, d)
        return torch.cat([blocks, last.bias.view(d, d)], dim=0)

    def features(self, graphs: GraphBatch) -> torch.Tensor:
        """The shared representation of each graph, ``[num_graphs, hidden]``."""
        h = F.relu(self.embed(graphs.x))
        source, target = graphs.edge_index
        mixing = self.edge_network[:-1](graphs.edge_attr)  # [edges, edge_hidden]
        mixing = torch.cat([mixing, mixing.new_ones(len(mixing), 1)], dim=1).unsqueeze(-1)
        basis = self._basis()
        width = basis.shape[0]
        degree = torch.zeros(len(h), dtype=h.dtype, device=h.device).index_add_(
            0, target, torch.ones_like(target, dtype=h.dtype)
        )
        inverse_degree = degree.clamp(min=1).reciprocal().unsqueeze(-1)
        for _ in range(self.steps):
            spread = (mixing * h.index_select(0, source).unsqueeze(1)).view(-1, width)
            inputs = h.new_zeros(len(h), width).index_add_(0, target, spread)
            aggregated = (inputs @ basis) * inverse_degree
            h = self.gru(F.relu(aggregated + self.root(h)), h)
        return self.trunk_out(self.readout(h, graphs.batch, graphs.num_graphs))

    def forward(self, graphs: GraphBatch, tasks: Sequence[str]) -> torch.Tensor:
        """Predictions (normalised scale) of ``tasks`` as ``[num_graphs, len(tasks)]``."""
        z = self.features(graphs)
        return torch.cat([self.heads[task](z) for task in tasks], dim=1)


# --------------------------------------------------------------------------------------------
# The problem
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _pyg_store(root: str, limit: int | None) -> MoleculeStore:
    return qm9_data.pyg_molecules(root, limit)


def molecules(*, limit: int | None = None, root: str | None = None) -> MoleculeStore:
    """The molecule pool: qm9pack's QM9 (cached), or PyG's raw QM9 in ``root``."""
    if root is None:
        return qm9_data.qm9pack_molecules(limit)
    return _pyg_store(str(Path(root).expanduser().resolve()), limit)


class QM9Problem(Problem):
    """QM9's 11 targets on a shared MPNN; one target, the others auxiliary.

    Use :func:`build` (or ``build_problem("qm9", ...)``) rather than the constructor.
    """

    name = "qm9"

    def __init__(
        self,
        *,
        target: str,
        seed: int,
        device: torch.device,
        batch_size: int,
        subset_train: int,
        subset_val: int,
        subset_test: int,
        data_seed: int,
        limit: int | None,
        data_dir: str | None,
        hidden: int,
        edge_hidden: int,
    ) -> None:
        self.target = target
        self.seed = seed
        self.device = device
        self.batch_size = batch_size
        self.hidden = hidden
        self.edge_hidden = edge_hidden
        self.options: dict[str, object] = {
            "subset_train": subset_train,
            "subset_val": subset_val,
            "subset_test": subset_test,
            "data_seed": data_seed,
            "limit": limit if limit is not None else "all",
            "source": "qm9pack" if data_dir is None else "pyg_raw",
        }
        self.tasks = tuple(Task(name, metric="mae", higher_is_better=False) for name in TARGETS)

        store = molecules(limit=limit, root=data_dir)
        needed = subset_train + subset_val + subset_test
        if needed > len(store):
            raise invalid(
                "subset_train",
                subset_train,
                f"small enough that subset_train + subset_val + subset_test ≤ {len(store)} "
                f"(the molecules available; {needed} requested)",
            )
        order = torch.randperm(len(store), generator=torch.Generator().manual_seed(data_seed))
        ids = {
            "test": order[:subset_test],
            "val": order[subset_test : subset_test + subset_val],
            "train": order[subset_test + subset_val : needed],
        }
        self.molecule_ids = ids
        train_y = store.y[ids["train"]]
        # Training statistics only: the held-out sets must not leak into the normalisation.
        self.mean = train_y.mean(dim=0)
        self.std = train_y.std(dim=0).clamp(min=1e-12)
        self._graphs: dict[str, GraphSet] = {}
        self._y: dict[str, torch.Tensor] = {}
        self._y_raw: dict[str, torch.Tensor] = {}
        for split, members in ids.items():
            self._graphs[split] = store.graphs(members, device)
            y = store.y[members]
            self._y[split] = ((y - self.mean) / self.std).float().to(device)
            self._y_raw[split] = y.to(device)
        self._chunks = {split: self._graphs[split].chunks(EVAL_CHUNK) for split in ("val", "test")}
        self._mean = self.mean.to(device)
        self._std = self.std.to(device)
        self._parts: dict[tuple[str, int], list[GraphBatch]] = {}  # target_chunks' batches

    def make_model(self) -> MPNN:
        """The MPNN trunk with one linear head per target (all 11, whatever the target)."""
        return MPNN(TARGETS, hidden=self.hidden, edge_hidden=self.edge_hidden)

    def _columns(self, tasks: Sequence[str]) -> list[int]:
        for task in tasks:
            if task not in TARGETS:
                raise one_of("task", task, TARGETS)
        return [TARGETS.index(task) for task in tasks]

    def task_losses(
        self, model: nn.Module, tasks: Sequence[str], generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        """One shared batch of molecules; the MSE of each task on the normalised scale."""
        columns = self._columns(tasks)
        graphs = self._graphs["train"]
        index = torch.randint(
            len(graphs), (self.batch_size,), generator=generator, device=self.device
        )
        predictions = model(graphs.batch(index), tasks)
        targets = self._y["train"][index][:, columns]
        errors = (predictions - targets).pow(2).mean(dim=0)
        return {task: errors[k] for k, task in enumerate(tasks)}

    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, split: Split, tasks: Sequence[str] | None = None
    ) -> dict[str, TaskMetrics]:
        """MAE in the original units (``mae``) and normalised MSE (``loss``) per task."""
        if split not in self._chunks:
            raise one_of("split", split, self._chunks)
        names = TARGETS if tasks is None else tuple(tasks)
        columns = self._columns(names)
        mean, std = self._mean[columns], self._std[columns]
        absolute = torch.zeros(len(names), dtype=torch.float64, device=self.device)
        squared = torch.zeros(len(names), dtype=torch.float64, device=self.device)
        start = 0
        with eval_mode(model):
            for chunk in self._chunks[split]:
                stop = start + chunk.num_graphs
                predictions = model(chunk, names).double()
                normalised = self._y[split][start:stop][:, columns].double()
                raw = self._y_raw[split][start:stop][:, columns]
                absolute += (predictions * std + mean - raw).abs().sum(dim=0)
                squared += (predictions - normalised).pow(2).sum(dim=0)
                start = stop
        n = max(start, 1)
        mae, loss = (absolute / n).tolist(), (squared / n).tolist()
        return {task: {"mae": mae[k], "loss": loss[k]} for k, task in enumerate(names)}

    def target_chunks(
        self, model: nn.Module, split: Split = "val", chunks: int = 1
    ) -> Iterator[tuple[float, int]]:
        """The target's −MAE on ``chunks`` consecutive parts of ``split`` (for pruning)."""
        column = self._columns([self.target])[0]
        graphs = self._graphs[split]
        key = (split, chunks)
        if key not in self._parts:
            members = torch.arange(len(graphs), device=self.device)
            self._parts[key] = [graphs.batch(part) for part in members.tensor_split(chunks)]
        start = 0
        for part in self._parts[key]:
            stop = start + part.num_graphs
            with torch.no_grad(), eval_mode(model):
                predicted = model(part, [self.target])[:, 0].double()
            raw = self._y_raw[split][start:stop, column]
            mae = float((predicted * self._std[column] + self._mean[column] - raw).abs().mean())
            yield self.task(self.target).score({"mae": mae}), stop - start
            start = stop

    def target_loss(self, model: nn.Module, split: Split = "val") -> torch.Tensor:
        """Mean squared error of the target on the normalised scale, differentiable."""
        column = self._columns([self.target])[0]
        total = torch.zeros((), device=self.device)
        start = 0
        with eval_mode(model):
            for chunk in self._chunks[split]:
                stop = start + chunk.num_graphs
                predicted = model(chunk, [self.target])[:, 0]
                total = total + (predicted - self._y[split][start:stop, column]).pow(2).sum()
                start = stop
        return total / max(start, 1)

    def split_sizes(self) -> dict[str, int]:
        return {split: len(graphs) for split, graphs in self._graphs.items()}

    def describe(self) -> dict[str, object]:
        description: dict[str, object] = {
            "benchmark": self.name,
            "target": self.target,
            "batch_size": self.batch_size,
            "hidden": self.hidden,
            "edge_hidden": self.edge_hidden,
            **self.options,
        }
        for task, mean, std in zip(TARGETS, self.mean.tolist(), self.std.tolist(), strict=True):
            description[f"{task}_train_mean"] = mean
            description[f"{task}_train_std"] = std
        return description


def build(
    *,
    target: str,
    seed: int,
    device: torch.device,
    batch_size: int = 64,
    subset_train: int = 20_000,
    subset_val: int = 2_000,
    subset_test: int = 2_000,
    data_seed: int = 0,
    limit: int | None = None,
    data_dir: str | None = None,
    hidden: int = 64,
    edge_hidden: int = 8,
) -> QM9Problem:
    """Build the QM9 problem; bad options raise :class:`~fm_optuna.errors.ConfigError`.

    The first call on a machine processes all of QM9 (about two minutes) and caches it.

    Args:
        target: One of :data:`TARGETS`.
        seed: The training seed (the split depends on ``data_seed`` only).
        device: Where the graphs live and batches are drawn.
        batch_size: Molecules per step (one batch serves every task).
        subset_train: Training molecules.
        subset_val: Validation molecules (every merge candidate is scored on them).
        subset_test: Test molecules.
        data_seed: Seed of the random split.
        limit: Use only the first ``limit`` molecules of the source (processed into a separate,
            fast cache); ``None`` for all 130,831.
        data_dir: A folder with PyG's raw QM9 files (``raw/gdb9.sdf`` ...) to use instead of
            qm9pack's copy.
        hidden: The MPNN's node state size.
        edge_hidden: Hidden units of the edge network.

    Example:
        >>> problem = build(target="mu", seed=0, device=torch.device("cpu"))  # doctest: +SKIP
        >>> problem.evaluate(problem.make_model(), "val", ["mu"])["mu"]["mae"]  # doctest: +SKIP
    """
    if target not in TARGETS:
        raise one_of("target", target, TARGETS)
    check_positive(
        batch_size=batch_size,
        subset_train=subset_train,
        subset_val=subset_val,
        subset_test=subset_test,
        hidden=hidden,
        edge_hidden=edge_hidden,
    )
    check_non_negative(data_seed=data_seed)
    if limit is not None:
        check_positive(limit=limit)
    if data_dir is not None and not isinstance(data_dir, str):
        raise invalid("data_dir", data_dir, "a folder path (a string) or absent")
    return QM9Problem(
        target=target,
        seed=seed,
        device=device,
        batch_size=batch_size,
        subset_train=subset_train,
        subset_val=subset_val,
        subset_test=subset_test,
        data_seed=data_seed,
        limit=limit,
        data_dir=data_dir,
        hidden=hidden,
        edge_hidden=edge_hidden,
    )
