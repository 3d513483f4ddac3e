"""The NYUv2 benchmark on a tiny fixture in MTAN's .npy layout: splits, losses, metrics, errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fm_optuna.benchmarks import build_problem, nyuv2
from fm_optuna.datasets.nyuv2 import NUM_CLASSES
from fm_optuna.errors import ConfigError
from tests.conftest import run_tiny_forkmerge
from tests.datasets.test_datasets import write_nyuv2

TRAIN, TEST = 6, 3


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("nyuv2")
    write_nyuv2(folder, {"train": TRAIN, "val": TEST})
    return folder


def problem_of(root: Path, **options: object) -> nyuv2.NYUv2Problem:
    merged = {"data_dir": str(root), "val_size": 2, "batch_size": 2, **options}
    return build_problem("nyuv2", **merged)  # type: ignore[return-value]


def seeded_model(problem: nyuv2.NYUv2Problem) -> nn.Module:
    torch.manual_seed(0)
    return problem.make_model()


class Constant(nn.Module):
    """Predicts class 0 everywhere, depth 2 m and the normal (0, 0, 1) for every pixel."""

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        n, _, h, w = images.shape
        logits = torch.zeros(n, NUM_CLASSES, h, w)
        logits[:, 0] = 1.0
        normal = torch.zeros(n, 3, h, w)
        normal[:, 2] = 1.0
        return {"segmentation": logits, "depth": torch.full((n, 1, h, w), 2.0), "normal": normal}


class TestProblem:
    def test_tasks_target_and_orientation(self, root: Path) -> None:
        problem = problem_of(root)
        assert problem.task_names == ("segmentation", "depth", "normal")
        assert problem.target == nyuv2.DEFAULT_TARGET == "segmentation"
        assert problem.auxiliaries == ("depth", "normal")
        assert problem.task("segmentation").higher_is_better
        assert not problem.task("depth").higher_is_better
        assert not problem.task("normal").higher_is_better
        assert problem_of(root, target="normal").target == "normal"
        described = problem.describe()
        assert described["train_images"] == TRAIN - 2 and described["val_images"] == 2
        assert described["test_images"] == TEST and described["image_size"] == "native"

    def test_shared_parameters_are_the_trunk(self, root: Path) -> None:
        problem = problem_of(root)
        model = seeded_model(problem)
        shared = {id(p) for p in problem.shared_parameters(model)}
        assert shared == {id(p) for p in model.trunk.parameters()}  # type: ignore[union-attr]
        assert not shared & {id(p) for p in model.heads.parameters()}  # type: ignore[union-attr]

    def test_validation_is_carved_from_train_by_the_data_seed(self, root: Path) -> None:
        problem = problem_of(root, val_size=2)
        train, val = problem.indices["train"], problem.indices["val"]
        assert len(val) == 2 and sorted(train + val) == list(range(TRAIN))
        assert problem.indices["test"] == list(range(TEST))
        assert problem_of(root, val_size=2).indices == problem.indices
        carves = {tuple(problem_of(root, data_seed=seed).indices["val"]) for seed in range(6)}
        assert len(carves) > 1
        limited = problem_of(root, limit=1)
        assert limited.split_sizes() == {"train": 1, "val": 1, "test": 1}
        assert limited.indices["train"] == problem.indices["train"][:1]

    def test_image_size_resizes_labels_with_nearest_neighbours(self, root: Path) -> None:
        problem = problem_of(root, image_size=[32, 40])
        for split in ("train", "val", "test"):
            images, targets = problem.batch(split, [0, 1])
            assert images.shape == (2, 3, 32, 40)
            labels = targets["segmentation"]
            assert labels.shape == (2, 32, 40) and labels.dtype == torch.long
            assert set(labels.unique().tolist()) <= set(range(-1, NUM_CLASSES))
            norms = targets["normal"].norm(dim=1)
            assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
            # The fixture's missing depth pixel (0, 0) stays missing at the corner.
            assert (targets["depth"][:, 0, 0, 0] == 0).all()
        metrics = problem.evaluate(seeded_model(problem), "val")
        assert all(math.isfinite(m["loss"]) for m in metrics.values())


class TestLosses:
    def test_finite_scalars_with_gradients_for_the_requested_tasks_only(self, root: Path) -> None:
        problem = problem_of(root)
        model = seeded_model(problem)
        losses = problem.task_losses(model, ["depth", "segmentation"], torch.Generator())
        assert list(losses) == ["depth", "segmentation"]
        for loss in losses.values():
            assert loss.dim() == 0 and torch.isfinite(loss) and loss.requires_grad
        sum(losses.values()).backward()  # type: ignore[union-attr]
        heads = model.heads  # type: ignore[union-attr]
        assert all(p.grad is None for p in heads["normal"].parameters())
        assert all(p.grad is not None for p in heads["depth"].parameters())
        assert all(p.grad is not None for p in problem.shared_parameters(model))
        assert problem.task_losses(model, [], torch.Generator()) == {}

    def test_reproducible_for_a_generator_seed(self, root: Path) -> None:
        problem = problem_of(root)
        model = seeded_model(problem)

        def losses(seed: int) -> list[float]:
            generator = torch.Generator().manual_seed(seed)
            values = problem.task_losses(model, nyuv2.TARGETS, generator)
            return [value.item() for value in values.values()]

        assert losses(3) == losses(3)
        assert losses(3) != losses(4)

    def test_in_memory_gives_the_same_batches_and_metrics(self, root: Path) -> None:
        lazy, cached = problem_of(root), problem_of(root, in_memory=True)
        model = seeded_model(lazy).eval()  # eval: BatchNorm does not change between the calls
        a = lazy.task_losses(model, nyuv2.TARGETS, torch.Generator().manual_seed(1))
        b = cached.task_losses(model, nyuv2.TARGETS, torch.Generator().manual_seed(1))
        assert {k: v.item() for k, v in a.items()} == {k: v.item() for k, v in b.items()}
        assert lazy.evaluate(model, "test") == cached.evaluate(model, "test")

    def test_augmentation_is_seeded_and_keeps_labels_valid(self, root: Path) -> None:
        problem = problem_of(root, augment=True)
        model = seeded_model(problem)
        first = problem.task_losses(model, ["normal"], torch.Generator().manual_seed(5))
        again = problem.task_losses(model, ["normal"], torch.Generator().manual_seed(5))
        assert first["normal"].item() == again["normal"].item()

        images, targets = problem.batch("train", [0, 1, 2, 3])
        targets["depth"] = torch.full_like(targets["depth"], 3.0)
        seen: set[float] = set()
        for seed in range(8):
            out_images, out = nyuv2.scale_crop(images, targets, torch.Generator().manual_seed(seed))
            assert out_images.shape == images.shape
            assert set(out["segmentation"].unique().tolist()) <= set(range(-1, NUM_CLASSES))
            # Zooming by s brings the scene s times closer: one depth of 3/s per image.
            for depth in out["depth"]:
                values = depth.unique().tolist()
                assert len(values) == 1
                seen.add(round(3.0 / values[0], 4))
        assert seen <= {1.0, 1.2, 1.5} and len(seen) > 1


class TestEvaluate:
    def test_keys(self, root: Path) -> None:
        problem = problem_of(root)
        model = seeded_model(problem)
        metrics = problem.evaluate(model, "val")
        assert list(metrics) == list(problem.task_names)
        assert set(metrics["segmentation"]) == {"miou", "pixel_accuracy", "loss"}
        assert set(metrics["depth"]) == {"abs_err", "rel_err", "loss"}
        assert set(metrics["normal"]) == {
            "mean_angle",
            "median_angle",
            "within_11_25",
            "within_22_5",
            "within_30",
            "loss",
        }
        for task in problem.tasks:
            assert task.metric in metrics[task.name]
        assert list(problem.evaluate(model, "test", ["normal"])) == ["normal"]
        with pytest.raises(ConfigError, match="split"):
            problem.evaluate(model, "train")  # type: ignore[arg-type]
        with pytest.raises(ConfigError, match="task"):
            problem.evaluate(model, "val", ["edges"])

    def test_metrics_against_a_hand_computation(self, tmp_path: Path) -> None:
        write_nyuv2(tmp_path, {"train": 3, "val": TEST})
        first = tmp_path / "val" / "normal" / "0.npy"
        normals = np.load(first)
        normals[:4] = 0  # pixels without a normal: in no metric
        np.save(first, normals)
        metrics = problem_of(tmp_path, val_size=1).evaluate(Constant(), "test")

        def load(folder: str) -> np.ndarray:
            path = tmp_path / "val" / folder
            return np.stack([np.load(path / f"{i}.npy") for i in range(TEST)])

        labels, depth, normal = load("label"), load("depth")[..., 0], load("normal")
        labelled = labels >= 0
        share_of_zero = (labels == 0).sum() / labelled.sum()
        classes = len(np.unique(labels[labelled]))  # IoU 0 for every other class present
        segmentation = metrics["segmentation"]
        assert segmentation["pixel_accuracy"] == pytest.approx(100 * share_of_zero)
        assert segmentation["miou"] == pytest.approx(100 * share_of_zero / classes)
        # Logits (1, 0, …, 0): the cross-entropy of every other class is log(e + 12).
        assert segmentation["loss"] == pytest.approx(
            math.log(math.e + NUM_CLASSES - 1) - (labels[labelled] == 0).mean()
        )

        measured = depth[depth != 0]
        assert metrics["depth"]["abs_err"] == pytest.approx(np.abs(2 - measured).mean(), rel=1e-6)
        assert metrics["depth"]["rel_err"] == pytest.approx(
            (np.abs(2 - measured) / measured).mean(), rel=1e-6
        )

        z = normal[np.abs(normal).sum(-1) != 0][:, 2]
        assert len(z) == normal[..., 0].size - 4 * normal.shape[2]
        angles = np.degrees(np.arccos(np.clip(z, -1, 1)))
        normals = metrics["normal"]
        assert normals["mean_angle"] == pytest.approx(angles.mean(), rel=1e-5)
        assert normals["median_angle"] == pytest.approx(np.median(angles), abs=0.006)
        assert normals["within_22_5"] == pytest.approx(100 * (angles < 22.5).mean())
        assert normals["within_30"] == pytest.approx(100 * (angles < 30).mean())
        assert normals["loss"] == pytest.approx((1 - z).mean(), rel=1e-5)


class TestErrors:
    def test_data_dir_is_required(self) -> None:
        with pytest.raises(ConfigError, match=r"`data_dir`.*required"):
            build_problem("nyuv2")

    def test_a_missing_folder_names_data_dir(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigError, match=r"Parameter `data_dir`.*train/image"):
            build_problem("nyuv2", data_dir=str(tmp_path / "nowhere"))

    def test_an_incomplete_folder_names_the_missing_file(self, tmp_path: Path) -> None:
        write_nyuv2(tmp_path, {"train": 4, "val": 2})
        (tmp_path / "val" / "depth" / "1.npy").unlink()
        with pytest.raises(ConfigError) as error:
            problem_of(tmp_path)
        message = str(error.value)
        assert message.startswith("Parameter `data_dir` should be a folder with the NYUv2")
        assert message.count("`data_dir`") == 1 and "val/depth/1.npy" in message

    @pytest.mark.parametrize(
        ("options", "parameter"),
        [
            ({"val_size": TRAIN}, "val_size"),
            ({"val_size": 0}, "val_size"),
            ({"batch_size": 0}, "batch_size"),
            ({"limit": 0}, "limit"),
            ({"data_seed": -1}, "data_seed"),
            ({"image_size": [16, 16]}, "image_size"),
            ({"image_size": [32]}, "image_size"),
            ({"image_size": "half"}, "image_size"),
            ({"augment": "yes"}, "problem.augment"),
            ({"in_memory": 1}, "problem.in_memory"),
            ({"target": "edges"}, "target"),
            ({"resolution": 2}, "resolution"),
        ],
    )
    def test_bad_options(self, root: Path, options: dict[str, object], parameter: str) -> None:
        with pytest.raises(ConfigError, match=f"`{parameter}"):
            problem_of(root, **options)


class TestEndToEnd:
    def test_forkmerge(self, root: Path) -> None:
        problem = problem_of(root, image_size=[32, 32])
        result = run_tiny_forkmerge(problem)
        metrics = problem.evaluate(result.model, "test", [problem.target])
        assert math.isfinite(metrics["segmentation"]["miou"])

    def test_cli_run(
        self,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        from fm_optuna.cli import main

        data = tmp_path / "nyuv2"
        write_nyuv2(data, {"train": 8, "val": 2})
        monkeypatch.chdir(tmp_path)  # the run's checkpoint goes under ./tracking
        code = main(
            [
                "run",
                "--benchmark",
                "nyuv2",
                "--data-dir",
                str(data),
                "--option",
                "val_size=3",
                "--option",
                "image_size=[32, 32]",
                "--steps",
                "4",
                "--dt",
                "2",
                "--branches",
                "2",
                "--batch-size",
                "2",
                "--strategy",
                "grid",
                "--grid-resolution",
                "0.5",
                "--ranking",
                "given",
                "--methods",
                "forkmerge",
                "--json",
                "--no-tracking",
            ]
        )
        assert code == 0
        report = json.loads(capsys.readouterr().out)
        assert report["problem"]["benchmark"] == "nyuv2"
        assert report["problem"]["val_images"] == 3  # both --option values reached the benchmark
        assert report["problem"]["image_size"] == "32x32"
        assert [r["method"] for r in report["results"]] == ["forkmerge"]
        assert report["results"][0]["target_metric"] == "miou"
        merges = report["forkmerge"]["merges"]
        assert len(merges) == 2 and all(sum(m["lambda"]) == pytest.approx(1) for m in merges)
