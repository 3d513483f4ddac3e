"""The domainnet benchmark on a tiny DomainNet folder written in the published layout.

The fixture (``write_domainnet``) holds 4 training and 2 test images per domain with labels
``i % 3``; images are decoded at 32 px so a ResNet-18 step takes milliseconds.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from fm_optuna.benchmarks import build_problem, default_target, options, targets
from fm_optuna.benchmarks import domainnet as bench
from fm_optuna.cli import main
from fm_optuna.errors import ConfigError
from tests.conftest import run_tiny_forkmerge
from tests.datasets.test_datasets import write_domainnet

TWO = ("clipart", "sketch")
SMALL: dict[str, object] = {"image_size": 32, "batch_size": 2}


@pytest.fixture
def root(tmp_path: Path) -> Path:
    folder = tmp_path / "domainnet"
    write_domainnet(folder, TWO)
    return folder


def make(root: Path, **options: object) -> bench.DomainNetProblem:
    values: dict[str, object] = {"data_dir": str(root), "domains": "clipart,sketch", **SMALL}
    values.update(options)
    problem = build_problem("domainnet", **values)  # type: ignore[arg-type]
    assert isinstance(problem, bench.DomainNetProblem)
    return problem


def names(paths: list[Path]) -> list[str]:
    return [path.name for path in paths]


# --------------------------------------------------------------------------------------------
# Registry, tasks and splits
# --------------------------------------------------------------------------------------------


def test_registry_targets_are_all_domains() -> None:
    assert targets("domainnet") == bench.DOMAINS
    assert bench.DOMAINS == ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")
    assert default_target("domainnet") == "clipart"
    assert {"data_dir", "domains", "batch_size", "image_size", "limit"} <= set(options("domainnet"))


def test_build_tasks_target_and_orientation(root: Path) -> None:
    problem = make(root, target="sketch")
    assert problem.task_names == TWO and problem.target == "sketch"
    assert problem.auxiliaries == ("clipart",)
    for task in problem.tasks:
        assert task.metric == "accuracy" and task.higher_is_better
    # 4 listed training images: 10 % rounds to 0, so one validation image is carved.
    assert problem.split_sizes() == {d: {"train": 3, "val": 1, "test": 2} for d in TWO}
    described = problem.describe()
    assert described["benchmark"] == "domainnet" and described["domains"] == "clipart,sketch"
    assert described["sketch_val"] == 1 and described["image_size"] == 32


def test_validation_is_carved_from_the_train_list(root: Path) -> None:
    problem = make(root, val_size=2)
    for domain in TWO:
        val, train = problem.image_paths("val", domain), problem.image_paths("train", domain)
        assert len(val) == 2 and len(train) == 2 and not set(val) & set(train)
        assert sorted(names(val + train)) == [f"{domain}_train_{i}.jpg" for i in range(4)]
        assert names(problem.image_paths("test", domain)) == [
            f"{domain}_test_{i}.jpg" for i in range(2)
        ]
    again = make(root, val_size=2)
    assert problem.image_paths("val", "clipart") == again.image_paths("val", "clipart")
    carved = {
        tuple(names(make(root, val_size=2, data_seed=s).image_paths("val", "clipart")))
        for s in range(8)
    }
    assert len(carved) > 1  # data_seed moves the carve


def test_a_domain_split_does_not_depend_on_the_other_domains(root: Path) -> None:
    both = make(root, val_size=1, data_seed=3)
    alone = make(root, target="sketch", domains=["sketch"], val_size=1, data_seed=3)
    assert alone.task_names == ("sketch",)
    for split in ("train", "val", "test"):
        assert both.image_paths(split, "sketch") == alone.image_paths(split, "sketch")
    # Order in the option does not matter: tasks follow DOMAINS.
    assert make(root, domains=["sketch", "clipart"]).task_names == TWO


def test_limit_takes_a_seeded_subset_of_each_list(root: Path) -> None:
    problem = make(root, limit=3, val_size=1)
    assert problem.split_sizes()["clipart"] == {"train": 2, "val": 1, "test": 2}
    assert make(root, limit=1000).split_sizes()["sketch"] == {"train": 3, "val": 1, "test": 2}
    with pytest.raises(ConfigError, match=r"`val_fraction`.*1 training images after `limit`"):
        make(root, limit=1)  # one image cannot be both validation and training


# --------------------------------------------------------------------------------------------
# Training losses
# --------------------------------------------------------------------------------------------


def test_task_losses_requested_tasks_only_finite_with_gradients(root: Path) -> None:
    problem = make(root)
    torch.manual_seed(0)
    model = problem.make_model()
    losses = problem.task_losses(model, ["sketch"], torch.Generator().manual_seed(1))
    assert set(losses) == {"sketch"}
    loss = losses["sketch"]
    assert loss.dim() == 0 and math.isfinite(loss.item()) and loss.requires_grad
    loss.backward()
    assert model.heads["sketch"].weight.grad is not None
    assert model.heads["clipart"].weight.grad is None  # another domain's head is untouched
    trunk_grads = [p.grad for p in problem.shared_parameters(model)]
    assert trunk_grads and all(g is not None for g in trunk_grads)
    shared = {id(p) for p in problem.shared_parameters(model)}
    assert id(model.heads["sketch"].weight) not in shared


def test_task_losses_are_reproducible_for_a_generator_seed(root: Path) -> None:
    problem = make(root, batch_size=3)
    torch.manual_seed(0)
    model = problem.make_model()

    def losses(seed: int) -> list[float]:
        torch.manual_seed(123)  # a global seed must not matter: only the generator does
        out = problem.task_losses(model, list(TWO), torch.Generator().manual_seed(seed))
        return [out[task].item() for task in TWO]

    first = losses(5)
    assert losses(5) == first
    assert any(losses(s) != first for s in range(6, 12))


@pytest.mark.parametrize("augment", [False, True])
def test_each_task_draws_from_its_own_domain(root: Path, augment: bool) -> None:
    """Batches come from the task's own training images (the carve), flipped only if asked."""
    problem = make(root, augment=augment, batch_size=4)
    seen: dict[str, set[bytes]] = {task: set() for task in TWO}

    class Recorder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(3, bench.NUM_CLASSES)

        def forward(self, images: torch.Tensor, task: str) -> torch.Tensor:
            for image in images:
                seen[task].add(image.contiguous().numpy().tobytes())
            return self.head(images.mean(dim=(2, 3)))

    for seed in range(4):
        problem.task_losses(Recorder(), list(TWO), torch.Generator().manual_seed(seed))
    for task in TWO:
        count = problem.split_sizes()[task]["train"]
        train = bench.normalise(problem._read("train", task, range(count)), problem.device)
        plain = {image.contiguous().numpy().tobytes() for image in train}
        flipped = {image.flip(-1).contiguous().numpy().tobytes() for image in train}
        assert seen[task] and seen[task] <= plain | flipped
        assert bool(seen[task] & (flipped - plain)) == augment


def test_decoding_matches_the_dataset_default_transform(root: Path) -> None:
    """uint8 decoding then batch normalisation equals the loader's Resize/ToTensor/Normalize."""
    from fm_optuna.datasets.domainnet import default_transform

    with Image.open(root / "clipart" / "class_1" / "clipart_train_1.jpg") as image:
        rgb = image.convert("RGB")
        expected = default_transform(32)(rgb)
        ours = bench.normalise(bench.ResizeToUint8(32)(rgb)[None], torch.device("cpu"))[0]
    assert ours.shape == (3, 32, 32)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


class BrightnessNet(nn.Module):
    """Class 1 for bright images, class 0 for dark ones: logits ``[-s, s, 0]``, ``s = ±1``."""

    def __init__(self) -> None:
        super().__init__()
        self.modes: list[bool] = []

    def forward(self, images: torch.Tensor, task: str) -> torch.Tensor:
        self.modes.append(self.training)
        s = torch.sign(images.mean(dim=(1, 2, 3)))
        return torch.stack([-s, s, torch.zeros_like(s)], dim=1)


def write_test_list(root: Path, domain: str, cases: list[tuple[int, bool]]) -> None:
    """Replace a domain's test list with solid black/white images of the given labels."""
    lines = []
    for i, (label, bright) in enumerate(cases):
        relative = f"{domain}/class_{label}/solid_{i}.png"
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (24, 20), (255, 255, 255) if bright else (0, 0, 0)).save(root / relative)
        lines.append(f"{relative} {label}")
    (root / "image_list" / f"{domain}_test.txt").write_text("\n".join(lines) + "\n")


def test_accuracy_and_loss_match_a_hand_computation(root: Path) -> None:
    # Predictions: dark → 0, bright → 1. Correct: 1st, 2nd and 4th; the label-2 image is wrong.
    write_test_list(root, "clipart", [(0, False), (1, True), (2, True), (0, False)])
    problem = make(root)
    model = BrightnessNet().train()
    metrics = problem.evaluate(model, "test", ["clipart"])
    assert set(metrics) == {"clipart"} and set(metrics["clipart"]) == {"accuracy", "loss"}
    assert metrics["clipart"]["accuracy"] == pytest.approx(75.0)
    # Cross-entropy of logits [-s, s, 0]: logsumexp = log(e + 1 + 1/e) for s = ±1, minus the
    # true class's logit: 1, 1, 0 and 1.
    expected = math.log(math.e + 1 + 1 / math.e) - 3 / 4
    assert metrics["clipart"]["loss"] == pytest.approx(expected)
    assert model.modes and not any(model.modes) and model.training  # eval inside, restored after


def test_evaluate_keys_and_determinism(root: Path) -> None:
    problem = make(root)
    torch.manual_seed(0)
    model = problem.make_model()
    for split in ("val", "test"):
        first = problem.evaluate(model, split)  # type: ignore[arg-type]
        assert set(first) == set(TWO)
        for metrics in first.values():
            assert set(metrics) == {"accuracy", "loss"} and 0 <= metrics["accuracy"] <= 100
            assert math.isfinite(metrics["loss"])
        assert problem.evaluate(model, split) == first  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="split"):
        problem.evaluate(model, "train")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="task"):
        problem.evaluate(model, "val", ["real"])
    with pytest.raises(ConfigError, match="task"):
        problem.task_losses(model, ["real"], torch.Generator().manual_seed(0))


def test_target_validation_images_are_cached(root: Path) -> None:
    problem = make(root, target="sketch", val_size=2)
    torch.manual_seed(0)
    model = problem.make_model()
    uncached = make(root, target="clipart", val_size=2)
    first = problem.evaluate(model, "val")
    for path in problem.image_paths("val", "sketch"):
        path.unlink()  # the target's validation images are no longer read from disk
    assert problem.evaluate(model, "val", ["sketch"]) == {"sketch": first["sketch"]}
    with pytest.raises(FileNotFoundError):  # sketch is not that problem's target
        uncached.evaluate(model, "val", ["sketch"])


# --------------------------------------------------------------------------------------------
# Mistakes
# --------------------------------------------------------------------------------------------


def test_data_dir_is_required() -> None:
    with pytest.raises(ConfigError, match=r"`data_dir` is required.*image_list/<domain>_train"):
        build_problem("domainnet")


def test_missing_folder_names_data_dir(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"Parameter `data_dir`.*Found `data_dir = .*nowhere"):
        build_problem("domainnet", data_dir=str(tmp_path / "nowhere"))


def test_partial_copy_names_the_missing_lists_and_the_domains_option(root: Path) -> None:
    with pytest.raises(ConfigError) as error:
        build_problem("domainnet", data_dir=str(root), **SMALL)  # type: ignore[arg-type]
    message = str(error.value)
    assert "Parameter `data_dir`" in message and "image_list/infograph_train.txt" in message
    assert "Domains present: clipart, sketch" in message and "`domains`" in message
    assert "\n" not in message


def test_missing_image_is_named(root: Path) -> None:
    (root / "sketch" / "class_1" / "sketch_test_1.jpg").unlink()
    with pytest.raises(ConfigError, match=r"`data_dir`.*missing: sketch/class_1/sketch_test_1"):
        make(root)


@pytest.mark.parametrize(
    ("change", "parameter"),
    [
        ({"domains": "clipart,photos"}, "domains"),
        ({"domains": ""}, "domains"),
        ({"domains": ["clipart", "clipart"]}, "domains"),
        ({"domains": 3}, "domains"),
        ({"target": "real"}, "target"),
        ({"target": "photos"}, "target"),
        ({"image_size": 16}, "image_size"),
        ({"batch_size": 1}, "batch_size"),
        ({"batch_size": 0}, "batch_size"),
        ({"limit": 0}, "limit"),
        ({"val_size": 0}, "val_size"),
        ({"val_size": 4}, "val_size"),
        ({"limit": 2, "val_size": 2}, "val_size"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"val_fraction": 0.9}, "val_fraction"),
        ({"val_fraction": 0.1, "val_size": 1}, "val_fraction"),
        ({"data_seed": -1}, "data_seed"),
        ({"augment": "yes"}, "problem.augment"),
        ({"cache_val": 1}, "problem.cache_val"),
        ({"data_dir": 7}, "data_dir"),
        ({"flip": True}, "flip"),
    ],
)
def test_bad_options_are_config_errors(
    root: Path, change: dict[str, object], parameter: str
) -> None:
    with pytest.raises(ConfigError, match=f"`{parameter}") as error:
        make(root, **change)
    assert "\n" not in str(error.value)


# --------------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------------


def test_forkmerge_runs_end_to_end(root: Path) -> None:
    problem = make(root, target="sketch")
    result = run_tiny_forkmerge(problem)
    metrics = problem.evaluate(result.model, "test", ["sketch"])["sketch"]
    assert 0 <= metrics["accuracy"] <= 100


def test_cli_run_smoke(
    root: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = main(
        [
            "run",
            "--benchmark",
            "domainnet",
            "--data-dir",
            str(root),
            "--option",
            "image_size=32",
            "--option",
            "domains=clipart,sketch",
            "--steps",
            "4",
            "--dt",
            "2",
            "--branches",
            "2",
            "--batch-size",
            "2",
            "--ranking",
            "given",
            "--strategy",
            "grid",
            "--grid-resolution",
            "0.5",
            "--checkpoint",
            str(tmp_path / "run.ckpt"),
            "--json",
            "--no-tracking",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    payload = json.loads(captured.out)
    assert payload["problem"]["benchmark"] == "domainnet"
    assert payload["problem"]["target"] == "clipart"
    assert payload["problem"]["image_size"] == 32  # --option reached the benchmark
    assert {r["method"] for r in payload["results"]} == {"stl", "ew", "forkmerge"}
    assert len(payload["forkmerge"]["merges"]) == 2
    for merge in payload["forkmerge"]["merges"]:
        assert sum(merge["lambda"]) == pytest.approx(1.0)


def test_cli_reports_a_missing_data_dir(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["run", "--benchmark", "domainnet", "--steps", "2", "--dt", "1", "--no-tracking"])
    assert code == 2
    assert "`data_dir` is required" in capsys.readouterr().err
