"""QM9: molecule processing, the batch gather, the MPNN (against PyG's layers) and the problem.

Everything runs on the first 700 molecules (``limit=700``), processed into a temporary cache in
about a second; the full 130,831-molecule processing never runs here.
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from fm_optuna.benchmarks import build_problem, qm9
from fm_optuna.datasets import qm9 as qm9_data
from fm_optuna.errors import ConfigError

LIMIT = 700
SMALL: dict[str, object] = {
    "limit": LIMIT,
    "subset_train": 500,
    "subset_val": 100,
    "subset_test": 100,
    "batch_size": 16,
}
BICYCLOPENTANE = 101  # C1C2CC1C2: DetermineBonds over-connects its bridgeheads


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh on-disk cache and empty memos, so the first build in this module is cold."""
    root = tmp_path_factory.mktemp("fm_optuna_cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FM_OPTUNA_CACHE", str(root))
        qm9_data.qm9pack_molecules.cache_clear()
        yield root
        qm9_data.qm9pack_molecules.cache_clear()


@pytest.fixture(scope="module")
def store() -> qm9_data.MoleculeStore:
    return qm9_data.qm9pack_molecules(LIMIT)


def small(**options: object) -> qm9.QM9Problem:
    return build_problem("qm9", **{**SMALL, **options})  # type: ignore[return-value]


class TestProcessing:
    def test_store_layout(self, store: qm9_data.MoleculeStore) -> None:
        assert len(store) == LIMIT
        assert store.gdb_index[:3].tolist() == [1, 2, 3]
        assert store.x.shape == (int(store.node_ptr[-1]), qm9_data.NODE_FEATURES)
        assert store.edge_index.shape == (2, int(store.edge_ptr[-1]))
        assert (store.node_ptr.diff() > 0).all() and (store.edge_ptr.diff() > 0).all()
        # Every atom is one of H, C, N, O, F and its atomic number agrees with the one-hot.
        one_hot = store.x[:, :5].long()
        assert (one_hot.sum(dim=1) == 1).all()
        numbers = torch.tensor([1, 6, 7, 8, 9])[one_hot.argmax(dim=1)]
        assert torch.equal(numbers, store.x[:, 5].long())
        assert (store.distance > 0.9).all() and (store.distance < 1.8).all()

    def test_edges_come_in_both_directions(self, store: qm9_data.MoleculeStore) -> None:
        for m in (0, 50, BICYCLOPENTANE, LIMIT - 1):
            edges = store.edge_index[:, store.edge_ptr[m] : store.edge_ptr[m + 1]].long().T
            pairs = {tuple(e) for e in edges.tolist()}
            assert pairs == {(b, a) for a, b in pairs}

    def test_methane_and_water_in_pyg_units(self, store: qm9_data.MoleculeStore) -> None:
        y = dict(zip(qm9_data.TARGETS, store.y[0].tolist(), strict=True))
        # Methane: HOMO −0.3877 Ha; U0 atomisation −17.1722 eV (PyG's y[0, 12]).
        assert y["homo"] == pytest.approx(-0.3877 * qm9_data.HARTREE_TO_EV)
        assert y["u0"] == pytest.approx(-17.1722, abs=1e-3)
        assert y["alpha"] == pytest.approx(13.21)
        assert y["cv"] == pytest.approx(6.469)
        # Water (molecule 3): one oxygen bonded to two hydrogens.
        atoms = store.x[store.node_ptr[2] : store.node_ptr[3]]
        assert atoms[:, 5].tolist() == [8, 1, 1]
        assert atoms[0, 10] == 2  # bonded hydrogens of the oxygen

    def test_strained_cage_takes_the_smiles_bonds(self, store: qm9_data.MoleculeStore) -> None:
        m = BICYCLOPENTANE
        assert qm9_data.BOND_SOURCES[int(store.bond_source[m])] == "smiles_match"
        edges = store.edge_index[:, store.edge_ptr[m] : store.edge_ptr[m + 1]].long()
        # C5H8: 6 C–C and 8 C–H bonds, no carbon with five neighbours.
        assert edges.shape[1] == 2 * 14
        degree = torch.bincount(edges[1])
        atoms = store.x[store.node_ptr[m] : store.node_ptr[m + 1]]
        carbons = atoms[:, 5] == 6
        assert (degree[carbons] == 4).all()
        assert set(store.bond_source.tolist()) <= {0, 1}

    def test_cache_is_reused_without_processing(
        self, cache: Path, store: qm9_data.MoleculeStore, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        assert (cache / f"{qm9_data.VERSION}-first{LIMIT}.pt").is_file()
        qm9_data.qm9pack_molecules.cache_clear()

        def fail(limit: int | None) -> None:
            raise AssertionError("processed again despite the cache file")

        monkeypatch.setattr(qm9_data, "process_qm9pack", fail)
        start = time.perf_counter()
        loaded = qm9_data.qm9pack_molecules(LIMIT)
        assert time.perf_counter() - start < 5.0
        assert torch.equal(loaded.y, store.y) and torch.equal(loaded.x, store.x)

    def test_bad_limit(self) -> None:
        with pytest.raises(ConfigError, match="limit"):
            qm9_data.qm9pack_molecules(0)


class TestGraphSet:
    def test_batch_matches_per_graph_slices(self, store: qm9_data.MoleculeStore) -> None:
        members = torch.tensor([5, 0, 42, 5])
        graphs = store.graphs(members, torch.device("cpu"))
        batch = graphs.batch(torch.tensor([2, 0, 3]))
        expected = [42, 5, 5]
        assert batch.num_graphs == 3
        offset = 0
        for position, m in enumerate(expected):
            atoms = slice(int(store.node_ptr[m]), int(store.node_ptr[m + 1]))
            n = atoms.stop - atoms.start
            mine = batch.batch == position
            assert int(mine.sum()) == n
            assert torch.equal(batch.x[mine], store.x[atoms].float())
            edges = store.edge_index[:, store.edge_ptr[m] : store.edge_ptr[m + 1]].long()
            own = (batch.edge_index[0] >= offset) & (batch.edge_index[0] < offset + n)
            assert torch.equal(batch.edge_index[:, own] - offset, edges)
            distances = store.distance[store.edge_ptr[m] : store.edge_ptr[m + 1]]
            assert torch.equal(batch.edge_attr[own, 4], distances)
            offset += n

    def test_chunks_cover_the_set_in_order(self, store: qm9_data.MoleculeStore) -> None:
        graphs = store.graphs(torch.arange(23), torch.device("cpu"))
        chunks = graphs.chunks(10)
        assert [c.num_graphs for c in chunks] == [10, 10, 3]
        assert torch.equal(torch.cat([c.x for c in chunks]), graphs.x)


class TestModel:
    def test_matches_pyg_nnconv_gru_set2set(self, store: qm9_data.MoleculeStore) -> None:
        """Our layers compute PyG's NNConv(aggr="mean") → GRU (×3) → Set2Set exactly."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            from torch_geometric.nn import NNConv
            from torch_geometric.nn.aggr import Set2Set

        torch.manual_seed(0)
        model = qm9.MPNN(["mu"], hidden=16, edge_hidden=6)
        batch = store.graphs(torch.arange(12), torch.device("cpu")).batch(torch.arange(12))
        conv = NNConv(16, 16, model.edge_network, aggr="mean")
        with torch.no_grad():
            conv.lin.weight.copy_(model.root.weight)
            conv.bias.copy_(model.root.bias)
        readout = Set2Set(16, processing_steps=3)
        readout.lstm.load_state_dict(model.readout.lstm.state_dict())

        h = torch.relu(model.embed(batch.x))
        for _ in range(3):
            h = model.gru(torch.relu(conv(h, batch.edge_index, batch.edge_attr)), h)
        expected = model.trunk_out(readout(h, batch.batch, dim_size=batch.num_graphs))
        assert torch.allclose(model.features(batch), expected, atol=1e-5)

    def test_heads_share_the_trunk(self) -> None:
        model = small().make_model()
        assert set(model.heads) == set(qm9.TARGETS)
        trunk = {name for name, _ in model.named_parameters() if not name.startswith("heads.")}
        assert trunk and all(isinstance(h, nn.Linear) for h in model.heads.values())


class ZeroModel(nn.Module):
    """Predicts 0 on the normalised scale, i.e. the training mean in original units."""

    def forward(self, graphs: qm9_data.GraphBatch, tasks: list[str]) -> torch.Tensor:
        return torch.zeros(graphs.num_graphs, len(tasks))


class TestProblem:
    def test_every_target_builds_with_all_tasks(self) -> None:
        for target in qm9.TARGETS:
            problem = small(target=target)
            assert problem.target == target
            assert problem.task_names == qm9.TARGETS
            assert all(t.metric == "mae" and not t.higher_is_better for t in problem.tasks)

    def test_splits_are_disjoint_and_fixed_by_the_data_seed(self) -> None:
        problem = small()
        ids = {split: set(ids.tolist()) for split, ids in problem.molecule_ids.items()}
        assert problem.split_sizes() == {"test": 100, "val": 100, "train": 500}
        assert not ids["train"] & ids["val"] and not ids["train"] & ids["test"]
        assert not ids["val"] & ids["test"]
        same = small(seed=3).molecule_ids["val"]
        assert torch.equal(same, problem.molecule_ids["val"])
        assert not torch.equal(small(data_seed=1).molecule_ids["val"], same)
        # A smaller training set leaves the evaluation sets alone.
        assert torch.equal(
            small(subset_train=200).molecule_ids["test"], problem.molecule_ids["test"]
        )

    def test_normalisation_uses_training_statistics(self, store: qm9_data.MoleculeStore) -> None:
        problem = small()
        train = problem._y["train"].double()
        assert torch.allclose(train.mean(dim=0), torch.zeros(11, dtype=torch.float64), atol=1e-5)
        assert torch.allclose(train.std(dim=0), torch.ones(11, dtype=torch.float64), atol=1e-5)
        raw = store.y[problem.molecule_ids["train"]]
        assert torch.allclose(problem.mean, raw.mean(dim=0))

    def test_mae_is_in_original_units(self, store: qm9_data.MoleculeStore) -> None:
        problem = small()
        results = problem.evaluate(ZeroModel(), "val")
        raw = store.y[problem.molecule_ids["val"]]
        expected = (raw - problem.mean).abs().mean(dim=0)
        for k, task in enumerate(qm9.TARGETS):
            assert results[task]["mae"] == pytest.approx(expected[k].item(), rel=1e-5)

    def test_one_batch_serves_every_task(self) -> None:
        problem = small()
        torch.manual_seed(0)
        model = problem.make_model()
        both = problem.task_losses(model, ["mu", "g"], torch.Generator().manual_seed(4))
        alone = problem.task_losses(model, ["g"], torch.Generator().manual_seed(4))
        assert both["g"].item() == pytest.approx(alone["g"].item(), rel=1e-6)

    def test_losses_are_finite_scalars_with_grad_and_seeded(self) -> None:
        problem = small()
        torch.manual_seed(0)
        model = problem.make_model()
        for tasks in (qm9.TARGETS, ("mu",)):
            losses = problem.task_losses(model, tasks, torch.Generator().manual_seed(0))
            assert list(losses) == list(tasks)
            assert all(loss.dim() == 0 and torch.isfinite(loss) for loss in losses.values())
            assert all(loss.requires_grad for loss in losses.values())

        def drawn(seed: int) -> float:
            generator = torch.Generator().manual_seed(seed)
            return problem.task_losses(model, ["mu"], generator)["mu"].item()

        assert drawn(1) == drawn(1) != drawn(2)

    def test_evaluate_is_deterministic_and_leaves_the_model_alone(self) -> None:
        problem = small()
        model = problem.make_model()
        before = copy.deepcopy(model.state_dict())
        for mode in (True, False):
            model.train(mode)
            first = problem.evaluate(model, "val")
            assert first == problem.evaluate(model, "val")
            assert all(module.training == mode for module in model.modules())
            for metrics in first.values():
                assert metrics["mae"] > 0 and metrics["loss"] > 0
        assert set(problem.evaluate(model, "test", ["h"])) == {"h"}
        for key, value in model.state_dict().items():
            assert torch.equal(value, before[key]), key

    def test_a_few_steps_lower_the_target_loss(self) -> None:
        # ZPVE is nearly a sum over bonds, so a few dozen steps already cut its error.
        problem = small(target="zpve", batch_size=32)
        torch.manual_seed(0)
        model = problem.make_model()
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        before = problem.evaluate(model, "val", ["zpve"])["zpve"]
        generator = torch.Generator().manual_seed(0)
        for _ in range(40):
            loss = problem.task_losses(model, ["zpve"], generator)["zpve"]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        after = problem.evaluate(model, "val", ["zpve"])["zpve"]
        assert after["loss"] < 0.6 * before["loss"]
        assert after["mae"] < 0.8 * before["mae"]

    def test_describe_is_flat(self) -> None:
        description = small().describe()
        assert description["benchmark"] == "qm9" and description["target"] == "mu"
        assert description["limit"] == LIMIT
        assert all(isinstance(v, int | float | str | bool) for v in description.values())

    @pytest.mark.parametrize(
        ("options", "parameter"),
        [
            ({"batch_size": -1}, "batch_size"),
            ({"data_seed": -1}, "data_seed"),
            ({"subset_val": 0}, "subset_val"),
            ({"subset_train": 650}, "subset_train"),
            ({"limit": 0}, "limit"),
            ({"data_dir": 3}, "data_dir"),
            ({"target": "gap"}, "target"),
        ],
    )
    def test_bad_options(self, options: dict[str, object], parameter: str) -> None:
        with pytest.raises(ConfigError, match=parameter):
            small(**options)

    def test_unknown_task_and_split(self) -> None:
        problem = small()
        model = problem.make_model()
        with pytest.raises(ConfigError, match="task"):
            problem.task_losses(model, ["gap"], torch.Generator())
        with pytest.raises(ConfigError, match="split"):
            problem.evaluate(model, "train")  # type: ignore[arg-type]
