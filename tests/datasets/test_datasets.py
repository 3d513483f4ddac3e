"""Loaders for the paper's data sets, each on a tiny fixture written in the published layout.

Every loader must read its layout, and turn a missing or incomplete folder into one ConfigError
that names what it expected (and never download anything).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from fm_optuna.datasets import aliexpress, ctr, domainnet, nyuv2
from fm_optuna.datasets import qm9 as qm9_data
from fm_optuna.errors import ConfigError

# --------------------------------------------------------------------------------------------
# AUC
# --------------------------------------------------------------------------------------------


class TestAuc:
    def test_hand_computed(self) -> None:
        # Pairs (positive, negative): 0.35 beats 0.1, loses to 0.4; 0.8 beats both → 3/4.
        assert ctr.auc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1])) == 0.75

    def test_ties_count_half(self) -> None:
        # Positive 0.5 ties negative 0.5 (½) and beats 0.2 (1); positive 0.9 beats both (2).
        scores = torch.tensor([0.2, 0.5, 0.5, 0.9])
        labels = torch.tensor([0, 0, 1, 1])
        assert ctr.auc(scores, labels) == pytest.approx(3.5 / 4)
        assert ctr.auc(torch.ones(6), torch.tensor([0, 1, 0, 1, 1, 0])) == 0.5

    def test_extremes_and_degenerate(self) -> None:
        labels = torch.tensor([0.0, 0.0, 1.0, 1.0])
        assert ctr.auc(torch.tensor([1.0, 2.0, 3.0, 4.0]), labels) == 1.0
        assert ctr.auc(torch.tensor([4.0, 3.0, 2.0, 1.0]), labels) == 0.0
        assert math.isnan(ctr.auc(torch.rand(5), torch.ones(5)))

    def test_matches_scikit_learn(self) -> None:
        from sklearn.metrics import roc_auc_score

        generator = torch.Generator().manual_seed(0)
        labels = torch.randint(0, 2, (500,), generator=generator)
        # Rounded scores have many ties, which is where rank-based AUCs usually go wrong.
        scores = (labels + torch.randn(500, generator=generator)).round(decimals=1)
        expected = roc_auc_score(labels.numpy(), scores.numpy())
        assert ctr.auc(scores, labels) == pytest.approx(expected, abs=1e-12)


# --------------------------------------------------------------------------------------------
# QM9 raw files (PyG layout)
# --------------------------------------------------------------------------------------------

SMILES = ["C", "N", "O", "CC", "CO", "C#N", "C=O", "CCO", "CC#C", "OC=O", "NC=O", "CCC"]
CSV_HEADER = (
    "mol_id,A,B,C,mu,alpha,homo,lumo,gap,r2,zpve,u0,u298,h298,g298,cv,"
    "u0_atom,u298_atom,h298_atom,g298_atom"
)
SKIPPED = 4  # 1-based molecule number listed in uncharacterized.txt


def write_qm9_raw(root: Path) -> list[list[float]]:
    """PyG's three raw files for the molecules in SMILES; returns the CSV's numeric rows."""
    from rdkit import Chem
    from rdkit.Chem import AllChem

    raw = root / "raw"
    raw.mkdir(parents=True)
    writer = Chem.SDWriter(str(raw / "gdb9.sdf"))
    rows = []
    for i, smiles in enumerate(SMILES, start=1):
        mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
        AllChem.EmbedMolecule(mol, randomSeed=i)
        mol.SetProp("_Name", f"gdb_{i}")
        writer.write(mol)
        # Distinct, recognisable values per molecule and column.
        rows.append([float(i * 100 + k) for k in range(19)])
    writer.close()
    lines = [CSV_HEADER] + [f"gdb_{i}," + ",".join(map(str, r)) for i, r in enumerate(rows, 1)]
    (raw / "gdb9.sdf.csv").write_text("\n".join(lines) + "\n")
    header = [f"header line {k}" for k in range(9)]
    (raw / "uncharacterized.txt").write_text(
        "\n".join([*header, f"  {SKIPPED}  C  0.1  0.2", "footer", ""])
    )
    return rows


class TestQm9Raw:
    def test_reads_the_raw_files_into_a_store(self, tmp_path: Path) -> None:
        rows = write_qm9_raw(tmp_path)
        store = qm9_data.pyg_molecules(tmp_path)
        kept = [i for i in range(1, len(SMILES) + 1) if i != SKIPPED]
        assert len(store) == len(kept)
        assert store.gdb_index.tolist() == kept
        assert store.x.shape[1] == qm9_data.NODE_FEATURES
        assert (store.distance > 0.8).all() and (store.distance < 2.0).all()
        assert set(store.bond_source.tolist()) == {qm9_data.BOND_SOURCES.index("sdf")}
        # mu, alpha straight from the CSV; U0 is PyG's atomisation energy (kcal/mol → eV).
        first = rows[0]
        y = store.y[0]
        assert y[qm9_data.TARGETS.index("mu")].item() == pytest.approx(first[3])
        assert y[qm9_data.TARGETS.index("alpha")].item() == pytest.approx(first[4])
        kcal_to_ev = 0.04336414
        assert y[qm9_data.TARGETS.index("u0")].item() == pytest.approx(first[15] * kcal_to_ev)
        # Methane: one carbon with four hydrogens, four bonds in both directions.
        assert int(store.node_ptr[1]) == 5 and int(store.edge_ptr[1]) == 8
        assert store.x[0, :5].tolist() == [0, 1, 0, 0, 0]

    def test_the_qm9_benchmark_runs_on_the_raw_files(self, tmp_path: Path) -> None:
        from fm_optuna.benchmarks import build_problem

        write_qm9_raw(tmp_path)
        problem = build_problem(
            "qm9",
            target="alpha",
            data_dir=str(tmp_path),
            subset_train=7,
            subset_val=2,
            subset_test=2,
            batch_size=4,
        )
        assert problem.describe()["source"] == "pyg_raw"
        model = problem.make_model()
        losses = problem.task_losses(model, ["alpha", "mu"], torch.Generator().manual_seed(0))
        assert all(torch.isfinite(loss) for loss in losses.values())
        assert math.isfinite(problem.evaluate(model, "val", ["alpha"])["alpha"]["mae"])

    def test_missing_folder_lists_the_raw_files(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigError, match=r"raw/gdb9\.sdf.*raw/gdb9\.sdf\.csv"):
            qm9_data.load_qm9_raw(tmp_path / "nowhere")

    def test_incomplete_folder_never_downloads(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            import torch_geometric.data.dataset as pyg_dataset

        def no_download(*args: object, **kwargs: object) -> None:
            raise AssertionError("a download was attempted")

        monkeypatch.setattr(pyg_dataset.Dataset, "_download", no_download)
        (tmp_path / "raw").mkdir()
        (tmp_path / "raw" / "gdb9.sdf").write_text("")
        with pytest.raises(ConfigError, match=r"missing: raw/gdb9\.sdf\.csv, raw/unchar"):
            qm9_data.load_qm9_raw(tmp_path)
        assert not (tmp_path / "processed").exists()


# --------------------------------------------------------------------------------------------
# NYUv2 (MTAN .npy layout)
# --------------------------------------------------------------------------------------------

HEIGHT, WIDTH = 32, 48


def write_nyuv2(root: Path, sizes: dict[str, int]) -> None:
    rng = np.random.default_rng(0)
    for split, count in sizes.items():
        for folder in nyuv2.FOLDERS:
            (root / split / folder).mkdir(parents=True)
        for i in range(count):
            label = rng.integers(-1, nyuv2.NUM_CLASSES, (HEIGHT, WIDTH)).astype(np.float32)
            depth = rng.uniform(0, 5, (HEIGHT, WIDTH, 1)).astype(np.float32)
            depth[0, 0] = 0  # a missing depth pixel
            normal = rng.normal(size=(HEIGHT, WIDTH, 3)).astype(np.float32)
            normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
            arrays = {
                "image": rng.uniform(0, 1, (HEIGHT, WIDTH, 3)).astype(np.float32),
                "label": label,
                "depth": depth,
                "normal": normal,
            }
            for folder, array in arrays.items():
                np.save(root / split / folder / f"{i}.npy", array)


class TestNyuv2:
    def test_items_and_model(self, tmp_path: Path) -> None:
        write_nyuv2(tmp_path, {"train": 3, "val": 2})
        train = nyuv2.NYUv2(tmp_path, "train")
        assert len(train) == 3 and len(nyuv2.NYUv2(tmp_path, "val")) == 2
        image, targets = train[1]
        assert image.shape == (3, HEIGHT, WIDTH) and image.dtype == torch.float32
        assert targets["segmentation"].shape == (HEIGHT, WIDTH)
        assert targets["segmentation"].dtype == torch.long
        assert targets["segmentation"].min() >= -1
        assert targets["depth"].shape == (1, HEIGHT, WIDTH)
        assert targets["normal"].shape == (3, HEIGHT, WIDTH)

        torch.manual_seed(0)
        model = nyuv2.NYUv2Net()
        images, batch = torch.utils.data.default_collate([train[0], train[2]])
        outputs = model(images)
        assert outputs["segmentation"].shape == (2, nyuv2.NUM_CLASSES, HEIGHT, WIDTH)
        assert outputs["depth"].shape == (2, 1, HEIGHT, WIDTH)
        norms = outputs["normal"].norm(dim=1)
        assert torch.allclose(norms, torch.ones_like(norms), atol=1e-4)
        losses = nyuv2.nyuv2_losses(outputs, batch)
        assert set(losses) == set(nyuv2.TASKS)
        assert all(torch.isfinite(loss) and loss > 0 for loss in losses.values())

    def test_missing_folder(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigError, match=r"train/image/\{i\}\.npy"):
            nyuv2.NYUv2(tmp_path / "nowhere")

    def test_incomplete_folder_names_the_missing_files(self, tmp_path: Path) -> None:
        write_nyuv2(tmp_path, {"train": 3, "val": 2})
        (tmp_path / "val" / "depth" / "1.npy").unlink()
        with pytest.raises(ConfigError, match=r"missing: val/depth/1\.npy\)"):
            nyuv2.NYUv2(tmp_path, "val")
        (tmp_path / "train" / "normal").rename(tmp_path / "train" / "normals")
        with pytest.raises(ConfigError, match=r"missing: train/normal\)"):
            nyuv2.NYUv2(tmp_path, "train")

    def test_bad_split(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigError, match="split"):
            nyuv2.NYUv2(tmp_path, "test")


# --------------------------------------------------------------------------------------------
# DomainNet (image folders + image lists)
# --------------------------------------------------------------------------------------------


def write_domainnet(root: Path, domains: tuple[str, ...] = ("clipart", "sketch")) -> None:
    from PIL import Image

    (root / "image_list").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for domain in domains:
        for split, count in (("train", 4), ("val", 2), ("test", 2)):
            lines = []
            for i in range(count):
                label = i % 3
                relative = f"{domain}/class_{label}/{domain}_{split}_{i}.jpg"
                (root / relative).parent.mkdir(parents=True, exist_ok=True)
                pixels = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / relative)
                lines.append(f"{relative} {label}")
            (root / "image_list" / f"{domain}_{split}.txt").write_text("\n".join(lines) + "\n")


class TestDomainNet:
    def test_items_and_model(self, tmp_path: Path) -> None:
        write_domainnet(tmp_path)
        train = domainnet.DomainNet(
            tmp_path, "clipart", "train", transform=domainnet.default_transform(32)
        )
        assert len(train) == 4
        image, label = train[1]
        assert image.shape == (3, 32, 32) and label == 1
        torch.manual_seed(0)
        model = domainnet.DomainNetNet(("clipart", "sketch"), num_classes=3).eval()
        images = torch.stack([train[i][0] for i in range(2)])
        with torch.no_grad():
            assert model(images, "clipart").shape == (2, 3)
            assert not torch.equal(model(images, "clipart"), model(images, "sketch"))

    def test_missing_folder_and_list(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigError, match=r"image_list/real_val\.txt"):
            domainnet.DomainNet(tmp_path / "nowhere", "real", "val")
        write_domainnet(tmp_path)
        with pytest.raises(ConfigError, match=r"missing: image_list/real_train\.txt, real\)"):
            domainnet.DomainNet(tmp_path, "real")

    def test_missing_image_is_named(self, tmp_path: Path) -> None:
        write_domainnet(tmp_path)
        (tmp_path / "sketch" / "class_1" / "sketch_test_1.jpg").unlink()
        with pytest.raises(ConfigError, match=r"missing: sketch/class_1/sketch_test_1\.jpg\)"):
            domainnet.DomainNet(tmp_path, "sketch", "test")

    def test_malformed_line_is_located(self, tmp_path: Path) -> None:
        write_domainnet(tmp_path)
        listing = tmp_path / "image_list" / "clipart_val.txt"
        listing.write_text(listing.read_text() + "clipart/class_0/x.jpg\n")
        with pytest.raises(ConfigError, match=r"clipart_val\.txt:3: expected"):
            domainnet.DomainNet(tmp_path, "clipart", "val")

    def test_bad_domain(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigError, match="domain"):
            domainnet.DomainNet(tmp_path, "photos")


# --------------------------------------------------------------------------------------------
# AliExpress (MTReclib CSV layout)
# --------------------------------------------------------------------------------------------


def write_aliexpress(root: Path, country: str = "NL", rows: int = 30) -> None:
    rng = np.random.default_rng(1)
    folder = root / f"AliExpress_{country}"
    folder.mkdir(parents=True)
    header = ["search_id", *[f"categorical_{k}" for k in range(1, 4)]]
    header += [*[f"numerical_{k}" for k in range(1, 3)], "click", "conversion"]
    for split in aliexpress.SPLITS:
        lines = [",".join(header)]
        for r in range(rows):
            click = int(rng.random() < 0.3)
            conversion = click * int(rng.random() < 0.5)
            categorical = rng.integers(0, [5, 7, 3])
            numerical = rng.normal(size=2).round(3)
            values = [r, *categorical, *numerical, click, conversion]
            lines.append(",".join(map(str, values)))
        (folder / f"{split}.csv").write_text("\n".join(lines) + "\n")


class TestAliExpress:
    def test_tables_and_model(self, tmp_path: Path) -> None:
        write_aliexpress(tmp_path)
        train = aliexpress.load_aliexpress(tmp_path, "NL", "train")
        test = aliexpress.load_aliexpress(tmp_path, "NL", "test")
        assert len(train) == 30
        assert train.categorical.shape == (30, 3) and train.categorical.dtype == torch.long
        assert train.numerical.shape == (30, 2) and train.numerical.dtype == torch.float32
        assert (train.conversion <= train.click).all()
        dims = aliexpress.field_dims(train, test)
        assert all(d <= limit for d, limit in zip(dims, [5, 7, 3], strict=True))
        torch.manual_seed(0)
        tasks = ["NL_click", "NL_conversion"]
        model = ctr.SharedBottom(dims, 2, tasks, esmm={"NL_conversion": "NL_click"}).eval()
        with torch.no_grad():
            logits = model(test.categorical, test.numerical, ["NL_click", "NL_conversion"])
        assert logits.shape == (30, 2)
        # ESMM: p(click and conversion) = p(click) × p(conversion | click) ≤ p(click).
        assert (logits[:, 1] <= logits[:, 0] + 1e-6).all()

    def test_rows_reads_only_the_head(self, tmp_path: Path) -> None:
        write_aliexpress(tmp_path)
        full = aliexpress.load_aliexpress(tmp_path, "NL", "train")
        head = aliexpress.load_aliexpress(tmp_path, "NL", "train", rows=7)
        assert len(head) == 7
        assert torch.equal(head.categorical, full.categorical[:7])
        assert torch.equal(head.click, full.click[:7])

    def test_missing_file(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigError, match=r"AliExpress_<country>/train\.csv"):
            aliexpress.load_aliexpress(tmp_path / "nowhere", "US")
        write_aliexpress(tmp_path)
        (tmp_path / "AliExpress_NL" / "test.csv").unlink()
        with pytest.raises(ConfigError, match=r"missing: AliExpress_NL/test\.csv\)"):
            aliexpress.load_aliexpress(tmp_path, "NL", "test")

    def test_wrong_columns(self, tmp_path: Path) -> None:
        (tmp_path / "AliExpress_FR").mkdir()
        (tmp_path / "AliExpress_FR" / "train.csv").write_text("a,b\n1,2\n")
        with pytest.raises(ConfigError, match="expected the columns search_id"):
            aliexpress.load_aliexpress(tmp_path, "FR")

    def test_bad_country(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigError, match="country"):
            aliexpress.load_aliexpress(tmp_path, "DE")
