"""The image benchmarks (digits, multimnist): what they share, then per-benchmark checks.

The Problem contract every shipped benchmark passes is in tests/benchmarks/test_contract.py.

Data are built once per module into a temporary cache (small sizes keep it to a few seconds).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from fm_optuna.benchmarks import BENCHMARKS, _images, build_problem, digits, multimnist
from fm_optuna.errors import ConfigError
from fm_optuna.problem._tasks import Problem

# Small splits so that building and evaluating stay fast; the defaults are checked by layout.
SMALL: dict[str, dict[str, object]] = {
    "digits": {
        "target_train": 40,
        "aux_train": 60,
        "val_size": 30,
        "test_size": 50,
        "aux_eval": 20,
        "batch_size": 8,
    },
    "multimnist": {"n_train": 60, "n_val": 30, "n_test": 40, "batch_size": 8},
}


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh on-disk cache and empty in-process memos, so the first build here is cold."""
    root = tmp_path_factory.mktemp("fm_optuna_cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FM_OPTUNA_CACHE", str(root))
        for memo in (digits.domain_pools, digits._float_pools, multimnist.pairs):
            memo.cache_clear()
        yield root


def small(name: str, **options: object) -> Problem:
    return build_problem(name, **{**SMALL.get(name, {}), **options})  # type: ignore[arg-type]


def images_of(problem: Problem, task: str, split: str) -> torch.Tensor:
    """The images of a task's split, through each benchmark's private storage."""
    if isinstance(problem, digits.DigitsProblem):
        return (problem._train[task] if split == "train" else problem._eval[split][task])[0]
    assert isinstance(problem, multimnist.MultiMnistProblem)
    return problem._images[split]


def distinct_rows(images: torch.Tensor) -> set[bytes]:
    return {image.numpy().tobytes() for image in images.cpu()}


# The image benchmarks; the others have their own files (tests/benchmarks/test_qm9.py, ...)
# because their data, metrics (MAE, AUC, mIoU) and models differ.
IMAGE_BENCHMARKS = ("digits", "multimnist")
assert set(IMAGE_BENCHMARKS) <= set(BENCHMARKS)


@pytest.fixture(params=IMAGE_BENCHMARKS)
def name(request: pytest.FixtureRequest) -> str:
    return request.param


class TestImageBenchmarks:
    """What the image benchmarks share beyond the contract (tests/benchmarks/test_contract.py):
    accuracies in percent, BatchNorm trunks, held-out images unseen in training, a trainable
    target."""

    def test_evaluate_reports_percentages_and_restores_mode(self, name: str) -> None:
        problem = small(name)
        model = problem.make_model()
        for mode in (True, False):
            model.train(mode)
            for split in ("val", "test"):
                results = problem.evaluate(model, split)
                assert set(results) == set(problem.task_names)
                for task in problem.tasks:
                    assert 0.0 <= results[task.name][task.metric] <= 100.0
                    assert results[task.name]["loss"] > 0.0
            assert all(module.training == mode for module in model.modules())
        only = problem.evaluate(model, "val", [problem.target])
        assert set(only) == {problem.target}

    def test_model_has_batchnorm(self, name: str) -> None:
        model = small(name).make_model()
        assert any(isinstance(module, nn.BatchNorm2d) for module in model.modules())

    def test_train_and_test_images_are_disjoint(self, name: str) -> None:
        problem = small(name)
        for task in problem.task_names:
            train = distinct_rows(images_of(problem, task, "train"))
            for split in ("val", "test"):
                held_out = distinct_rows(images_of(problem, task, split))
                if task == digits.NOISY:
                    continue  # evaluated on its own training images by design
                assert not train & held_out, (task, split)

    def test_a_few_steps_lower_the_target_loss(self, name: str) -> None:
        problem = small(name)
        torch.manual_seed(0)
        model = problem.make_model()
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)

        def probe() -> float:
            generator = torch.Generator().manual_seed(123)
            with torch.no_grad():
                drawn = [problem.task_losses(model, [problem.target], generator) for _ in range(4)]
            return sum(losses[problem.target].item() for losses in drawn) / len(drawn)

        before = probe()
        generator = torch.Generator().manual_seed(0)
        for _ in range(25):
            loss = problem.task_losses(model, [problem.target], generator)[problem.target]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        assert probe() < 0.8 * before


class TestDigits:
    def test_tasks_in_fixed_order(self) -> None:
        assert small("digits", target="mnistm").task_names == digits.DOMAINS
        assert small("digits", harmful_aux=True).task_names == (*digits.DOMAINS, digits.NOISY)
        assert digits.NOISY not in digits.TARGETS

    def test_images_are_normalised_colour(self) -> None:
        problem = small("digits")
        for task in problem.task_names:
            images = images_of(problem, task, "train")
            assert images.shape[1:] == (3, 28, 28)
            assert images.dtype == torch.float32
            assert images.min() >= -1.0 and images.max() <= 1.0

    def test_split_sizes(self) -> None:
        problem = small("digits", target="synfont")
        sizes = problem.split_sizes()
        assert sizes["synfont"] == {"train": 40, "val": 30, "test": 50}
        for aux in problem.auxiliaries:
            assert sizes[aux] == {"train": 60, "val": 20, "test": 20}

    def test_default_layout_fits_uci(self) -> None:
        options = {
            "target_train": 300,
            "aux_train": 2000,
            "val_size": 500,
            "test_size": 1000,
            "aux_eval": 250,
        }
        target = digits._layout("uci", 1797, is_target=True, **options)
        assert (target.train, target.val, target.test) == (300, 500, 997)
        aux = digits._layout("uci", 1797, is_target=False, **options)
        assert (aux.train, aux.val, aux.test) == (1297, 250, 250)
        mnist = digits._layout("mnist", 2500, is_target=False, **options)
        assert (mnist.train, mnist.val, mnist.test) == (2000, 250, 250)

    def test_mnist_and_mnistm_use_disjoint_images(self) -> None:
        problem = small("digits", target="mnist")
        used = {
            domain: torch.cat([problem.sources(domain, s) for s in ("train", "val", "test")])
            for domain in ("mnist", "mnistm")
        }
        assert not set(used["mnist"].tolist()) & set(used["mnistm"].tolist())
        pools = digits.domain_pools(0, 120)
        assert not set(pools["mnist/source"].tolist()) & set(pools["mnistm/source"].tolist())

    def test_splits_are_fixed_by_the_data_seed(self) -> None:
        first = small("digits", seed=0)
        second = small("digits", seed=7)
        other = small("digits", data_seed=1)
        same = images_of(first, "uci", "test")
        assert torch.equal(same, images_of(second, "uci", "test"))
        assert not torch.equal(same, images_of(other, "uci", "test"))

    def test_noisy_mnist_shares_the_target_head(self) -> None:
        problem = small("digits", target="synfont", harmful_aux=True)
        torch.manual_seed(0)
        model = problem.make_model()
        assert digits.NOISY not in model.heads
        assert model.head_of(digits.NOISY) == "synfont"

        def noisy_loss() -> float:
            generator = torch.Generator().manual_seed(5)
            with torch.no_grad():
                return problem.task_losses(model, [digits.NOISY], generator)[digits.NOISY].item()

        before = noisy_loss()
        with torch.no_grad():
            model.heads["mnist"].weight.add_(1.0)
        assert noisy_loss() == before
        with torch.no_grad():
            model.heads["synfont"].weight.add_(1.0)
        assert noisy_loss() != before

    def test_noisy_labels_are_random_and_fixed(self) -> None:
        problem = small("digits", harmful_aux=True)
        noisy_labels = problem._train[digits.NOISY][1]
        assert problem.split_sizes()[digits.NOISY]["train"] == len(noisy_labels) > 0
        # Its images are the mnist domain's training images (plus unused ones), never held out.
        noisy_sources = set(problem.sources(digits.NOISY, "train").tolist())
        assert set(problem.sources("mnist", "train").tolist()) <= noisy_sources
        for split in ("val", "test"):
            assert not noisy_sources & set(problem.sources("mnist", split).tolist())
        pools = digits.domain_pools(0, 120)
        true_labels = pools["mnist/labels"][problem.sources(digits.NOISY, "train")]
        assert (true_labels == noisy_labels).float().mean() < 0.3
        assert torch.equal(noisy_labels, small("digits", harmful_aux=True)._train[digits.NOISY][1])

    @pytest.mark.parametrize(
        ("options", "parameter"),
        [
            ({"target_train": 0}, "target_train"),
            ({"aux_train": -5}, "aux_train"),
            ({"val_size": 0}, "val_size"),
            ({"harmful_aux": "yes"}, "harmful_aux"),
            ({"target": "uci", "target_train": 1797}, "target_train"),
            ({"aux_eval": 1300}, "aux_eval"),
        ],
    )
    def test_bad_options(self, options: dict[str, object], parameter: str) -> None:
        with pytest.raises(ConfigError, match=parameter):
            small("digits", **options)

    def test_cold_build_left_a_cache_file_that_a_fresh_memo_loads(
        self, cache: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        small("digits")
        files = sorted(cache.glob("digits-v1-*.pt"))
        assert files, list(cache.iterdir())
        expected = digits.domain_pools(0, 120)
        digits.domain_pools.cache_clear()

        def fail(*args: object) -> None:
            raise AssertionError("rebuilt despite the cache file")

        monkeypatch.setattr(digits, "_build_pools", fail)
        start = time.perf_counter()
        loaded = digits.domain_pools(0, 120)
        assert time.perf_counter() - start < 5.0
        assert loaded.keys() == expected.keys()
        assert all(torch.equal(loaded[key], expected[key]) for key in expected)


class TestMultiMnist:
    def test_one_batch_serves_both_tasks(self) -> None:
        problem = small("multimnist")
        model = problem.make_model()
        both = problem.task_losses(model, ["left", "right"], torch.Generator().manual_seed(3))
        left = problem.task_losses(model, ["left"], torch.Generator().manual_seed(3))
        assert set(left) == {"left"}
        assert both["left"].item() == pytest.approx(left["left"].item(), rel=1e-6)

    def test_splits_use_disjoint_digit_pools(self) -> None:
        problem = small("multimnist")
        assert problem.split_sizes() == {"train": 60, "val": 30, "test": 40}
        used = {split: set(problem.sources(split).flatten().tolist()) for split in problem._source}
        assert not used["train"] & used["val"]
        assert not used["train"] & used["test"]
        assert not used["val"] & used["test"]
        assert (problem.sources("train")[:, 0] != problem.sources("train")[:, 1]).all()

    def test_labels_match_the_source_digits(self) -> None:
        problem = small("multimnist")
        _, labels = _images.shuffled_mnist(0)
        sources = problem.sources("test")
        assert torch.equal(problem._labels["test"]["left"], torch.from_numpy(labels[sources[:, 0]]))
        assert torch.equal(
            problem._labels["test"]["right"], torch.from_numpy(labels[sources[:, 1]])
        )

    def test_too_small_a_split_raises(self) -> None:
        with pytest.raises(ConfigError, match="n_val"):
            small("multimnist", n_train=10_000, n_val=1)


class TestCache:
    def test_load_or_build_writes_once_and_atomically(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("FM_OPTUNA_CACHE", str(tmp_path / "nested"))
        calls: list[int] = []

        def build() -> dict[str, torch.Tensor]:
            calls.append(1)
            return {"x": torch.arange(3)}

        first = _images.load_or_build("toy.pt", build)
        second = _images.load_or_build("toy.pt", build)
        assert len(calls) == 1
        assert torch.equal(first["x"], second["x"])
        assert [path.name for path in (tmp_path / "nested").iterdir()] == ["toy.pt"]

    def test_unreadable_cache_is_rebuilt(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("FM_OPTUNA_CACHE", str(tmp_path))
        (tmp_path / "toy.pt").write_bytes(b"half a file")
        data = _images.load_or_build("toy.pt", lambda: {"x": torch.ones(2)})
        assert torch.equal(data["x"], torch.ones(2))
        assert torch.equal(torch.load(tmp_path / "toy.pt", weights_only=True)["x"], torch.ones(2))

    def test_default_cache_dir(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.delenv("FM_OPTUNA_CACHE", raising=False)
        assert _images.cache_dir() == Path.home() / ".cache" / "fm_optuna"


@pytest.mark.parametrize("benchmark", IMAGE_BENCHMARKS)
def test_inference_trunk_computes_the_same_function_in_eval_mode(
    benchmark: str, cache: Path
) -> None:
    problem = small(benchmark)
    torch.manual_seed(0)
    model = problem.make_model()
    with torch.no_grad():  # move BatchNorm statistics and affine parameters off their defaults
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    model.eval()
    images = torch.randn(8, *model_input_shape(problem)).contiguous(
        memory_format=torch.channels_last
    )
    fast = _images.inference_trunk(model.trunk)
    assert not any(isinstance(m, nn.BatchNorm2d | nn.MaxPool2d) for m in fast.modules())
    with torch.no_grad():
        torch.testing.assert_close(fast(images), model.trunk(images), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", [(3, 4, 24, 24), (2, 5, 7, 9), (1, 1, 2, 2)])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_max_pool_2x2_equals_torch_max_pool(
    shape: tuple[int, ...], layout: torch.memory_format
) -> None:
    images = torch.randn(*shape).contiguous(memory_format=layout)
    assert torch.equal(_images.MaxPool2x2()(images), nn.MaxPool2d(2)(images))


def test_inference_trunk_keeps_pools_it_cannot_replace() -> None:
    trunk = nn.Sequential(nn.MaxPool2d(3), nn.MaxPool2d(2, ceil_mode=True), nn.MaxPool2d(2))
    kinds = [type(m) for m in _images.inference_trunk(trunk)]
    assert kinds == [nn.MaxPool2d, nn.MaxPool2d, _images.MaxPool2x2]


def model_input_shape(problem: Problem) -> tuple[int, ...]:
    first = next(m for m in problem.make_model().modules() if isinstance(m, nn.Conv2d))
    return (first.in_channels, 28, 28)
