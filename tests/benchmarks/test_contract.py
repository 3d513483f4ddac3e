"""The Problem contract, run over every shipped benchmark (``fm_optuna.benchmarks.BENCHMARKS``).

What the ForkMerge loop, the merge search and the outer study rely on, whatever the data: the
problem builds for every declared target and passes :func:`check_problem`; a seeded model is
reproducible; ``task_losses`` gives a finite scalar loss per requested task on a batch fixed by
the generator, with gradients in the shared trunk; ``evaluate`` gives every task's primary metric
on both splits and leaves the model alone; the target's score follows its ``Task``; and the
optional methods a problem overrides (``target_chunks``, ``target_example_scores``,
``target_loss``) agree with ``evaluate``.

Each benchmark is built small (the sizes of its own test file); the folder data sets (NYUv2,
DomainNet, AliExpress) read tiny fixtures written by the loaders' tests. Benchmark-specific
checks (layouts, hand-computed metrics, the CLI) stay in the per-benchmark files.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from fm_optuna.benchmarks import BENCHMARKS, build_problem, default_target, targets
from fm_optuna.benchmarks import aliexpress as aliexpress_benchmark
from fm_optuna.benchmarks import domainnet as domainnet_benchmark
from fm_optuna.core import target_score
from fm_optuna.errors import ConfigError
from fm_optuna.problem import check_problem
from fm_optuna.problem._tasks import Problem, Task, describe_problem, has_capability
from tests.datasets.test_datasets import write_aliexpress, write_domainnet, write_nyuv2

SPLITS = ("val", "test")

# Small options of each benchmark, given the folder holding the fixture data sets.
SMALL: dict[str, Callable[[Path], dict[str, object]]] = {
    "digits": lambda _: {
        "target_train": 40,
        "aux_train": 60,
        "val_size": 30,
        "test_size": 50,
        "aux_eval": 20,
        "batch_size": 8,
    },
    "multimnist": lambda _: {"n_train": 60, "n_val": 30, "n_test": 40, "batch_size": 8},
    "qm9": lambda _: {
        "limit": 700,
        "subset_train": 500,
        "subset_val": 100,
        "subset_test": 100,
        "batch_size": 16,
    },
    "movielens": lambda _: {"batch_size": 64},
    "nyuv2": lambda root: {"data_dir": str(root / "nyuv2"), "val_size": 2, "batch_size": 2},
    "domainnet": lambda root: {
        "data_dir": str(root / "domainnet"),
        "image_size": 32,
        "batch_size": 2,
    },
    "aliexpress": lambda root: {
        "data_dir": str(root / "aliexpress"),
        "batch_size": 32,
        "embed_dim": 4,
    },
}
# Whether a larger value of each primary metric is better: a new metric must be placed here.
HIGHER_IS_BETTER = {
    "accuracy": True,
    "auc": True,
    "miou": True,
    "mae": False,
    "abs_err": False,
    "mean_angle": False,
}
CAPABILITIES = ("target_chunks", "target_example_scores", "target_loss")
# The benchmarks that override optional methods (the others inherit Problem's defaults).
CAPABLE: dict[str, set[str]] = {
    "digits": set(CAPABILITIES),
    "qm9": {"target_chunks", "target_loss"},
}


def test_every_shipped_benchmark_is_in_the_contract_suite() -> None:
    assert set(SMALL) == set(BENCHMARKS), "give each new benchmark its small options in SMALL"


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Built data sets go to a temporary cache, not the user's."""
    root = tmp_path_factory.mktemp("fm_optuna_cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FM_OPTUNA_CACHE", str(root))
        yield root


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder benchmarks' fixtures, every domain and country so that every target builds."""
    root = tmp_path_factory.mktemp("data")
    write_nyuv2(root / "nyuv2", {"train": 6, "val": 3})
    write_domainnet(root / "domainnet", domainnet_benchmark.DOMAINS)
    # 400 rows: enough CTCVR positives in each country's validation carve for an AUC.
    for country in aliexpress_benchmark.COUNTRIES:
        write_aliexpress(root / "aliexpress", country, rows=400)
    return root


@pytest.fixture(scope="module", params=BENCHMARKS)
def name(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def small(name: str, data_root: Path) -> dict[str, object]:
    return SMALL[name](data_root)


@pytest.fixture(scope="module")
def problem(name: str, small: dict[str, object]) -> Problem:
    return build_problem(name, **small)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def rebuilt(name: str, small: dict[str, object]) -> Problem:
    """The same problem built again, as another worker or a resumed run builds it."""
    return build_problem(name, **small)  # type: ignore[arg-type]


def fresh(problem: Problem, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return problem.make_model().to(problem.device)


_MODELS: dict[tuple[Problem, int], nn.Module] = {}


def seeded(problem: Problem, seed: int = 0) -> nn.Module:
    """A copy of the problem's model made from ``seed`` (a ResNet is made once, not per test)."""
    if (problem, seed) not in _MODELS:
        _MODELS[problem, seed] = fresh(problem, seed)
    return copy.deepcopy(_MODELS[problem, seed])


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def assert_same_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    now = model.state_dict()
    assert now.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(now[key], value), key


def drawn(
    problem: Problem, model: nn.Module, seed: int, tasks: tuple[str, ...] | None = None
) -> dict[str, float]:
    generator = torch.Generator(device=problem.device).manual_seed(seed)
    losses = problem.task_losses(model, list(tasks or problem.task_names), generator)
    return {task: loss.item() for task, loss in losses.items()}


def a_few(declared: tuple[str, ...], default: str) -> tuple[str, ...]:
    """Every target of a short list; of a long one (MovieLens's 14, QM9's 11) a spread over it
    that keeps its first, last and default target."""
    if len(declared) <= 8:
        return declared
    spread = {*declared[:: math.ceil(len(declared) / 6)], declared[-1], default}
    return tuple(target for target in declared if target in spread)


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)


class TestContract:
    """What the loop relies on, for every shipped benchmark."""

    # ---------------------------------------------------------------- registry and targets

    def test_check_problem_passes_without_warnings(self, problem: Problem) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a ProblemWarning (heads taken for trunk) too
            check_problem(problem)

    def test_default_target_is_declared_and_built(self, name: str, problem: Problem) -> None:
        declared = targets(name)
        assert declared and len(set(declared)) == len(declared)
        assert default_target(name) in declared
        assert problem.target == default_target(name)

    def test_every_declared_target_builds_with_consistent_tasks(
        self, name: str, small: dict[str, object]
    ) -> None:
        seen: dict[str, Task] = {}
        for target in a_few(targets(name), default_target(name)):
            problem = build_problem(name, target=target, **small)  # type: ignore[arg-type]
            assert problem.name == name
            assert problem.target == target and target in problem.task_names
            assert len(set(problem.task_names)) == len(problem.tasks)
            assert problem.auxiliaries == tuple(t for t in problem.task_names if t != target)
            for task in problem.tasks:
                # A task keeps its metric and direction whichever task is the target.
                assert seen.setdefault(task.name, task) == task, task.name
        assert set(targets(name)) <= set(seen)  # the targets not built are tasks of those built

    def test_tasks_name_a_primary_metric_in_its_direction(self, problem: Problem) -> None:
        for task in problem.tasks:
            assert isinstance(task.name, str) and task.name
            assert isinstance(task.higher_is_better, bool)
            assert task.metric in HIGHER_IS_BETTER, f"{task.metric}: add it to HIGHER_IS_BETTER"
            assert task.higher_is_better == HIGHER_IS_BETTER[task.metric], task.name

    def test_describe_is_flat_and_names_the_problem(self, name: str, problem: Problem) -> None:
        description = describe_problem(problem)
        assert description["benchmark"] == name
        assert description["target"] == problem.target
        for key, value in description.items():
            assert isinstance(key, str)
            # Scalars only (tracking logs None as an empty parameter, like config.as_params).
            assert value is None or isinstance(value, int | float | str | bool), key

    def test_unknown_option_and_target_are_config_errors(
        self, name: str, small: dict[str, object]
    ) -> None:
        with pytest.raises(ConfigError, match="bacth_size"):
            build_problem(name, **small, bacth_size=8)  # type: ignore[arg-type]
        with pytest.raises(ConfigError, match="target"):
            build_problem(name, **{**small, "target": "nope"})  # type: ignore[arg-type]

    @pytest.mark.parametrize("option", ["batch_size", "data_seed"])
    def test_bad_common_options_are_config_errors(
        self, name: str, small: dict[str, object], option: str
    ) -> None:
        with pytest.raises(ConfigError, match=f"`{option}"):
            build_problem(name, **{**small, option: -1})  # type: ignore[arg-type]

    def test_a_folder_benchmark_without_its_folder_names_data_dir(
        self, name: str, small: dict[str, object]
    ) -> None:
        if "data_dir" not in small:
            pytest.skip(f"{name} reads packaged data")
        without = {key: value for key, value in small.items() if key != "data_dir"}
        with pytest.raises(ConfigError, match="`data_dir`"):
            build_problem(name, **without)  # type: ignore[arg-type]

    # ---------------------------------------------------------------- the model

    def test_model_is_reproducible_from_a_seed(self, problem: Problem, rebuilt: Problem) -> None:
        first = state_of(fresh(problem, 3))
        assert_same_state(fresh(problem, 3), first)
        assert_same_state(fresh(rebuilt, 3), first)
        other = fresh(problem, 4).state_dict()
        assert any(not torch.equal(other[key], value) for key, value in first.items())

    def test_shared_parameters_are_a_strict_subset_of_the_trainable_ones(
        self, problem: Problem
    ) -> None:
        model = seeded(problem)
        trainable = {id(p) for p in model.parameters() if p.requires_grad}
        shared = {id(p) for p in problem.shared_parameters(model)}
        assert shared and shared < trainable  # the rest are the task heads

    # ---------------------------------------------------------------- training losses

    @pytest.mark.parametrize("which", ["all", "target", "auxiliaries"])
    def test_losses_are_finite_scalars_for_exactly_the_requested_tasks(
        self, problem: Problem, which: str
    ) -> None:
        tasks = {
            "all": problem.task_names,
            "target": (problem.target,),
            "auxiliaries": problem.auxiliaries,
        }[which]
        if not tasks:
            pytest.skip("single-task problem")
        model = seeded(problem)
        losses = problem.task_losses(model, list(tasks), torch.Generator().manual_seed(0))
        assert set(losses) == set(tasks)
        for task, loss in losses.items():
            assert isinstance(loss, torch.Tensor) and loss.dim() == 0, task
            assert torch.isfinite(loss) and loss.requires_grad, task

    def test_every_task_loss_reaches_the_shared_parameters(self, problem: Problem) -> None:
        model = seeded(problem)
        before = {name: p.detach().clone() for name, p in model.named_parameters()}
        shared = problem.shared_parameters(model)
        for task in problem.task_names:
            model.zero_grad(set_to_none=True)
            generator = torch.Generator().manual_seed(0)
            problem.task_losses(model, [task], generator)[task].backward()
            grads = [p.grad for p in shared]
            assert all(g is not None for g in grads), task
            assert all(torch.isfinite(g).all() for g in grads), task  # type: ignore[arg-type]
            assert any(g.abs().sum() > 0 for g in grads), task  # type: ignore[union-attr]
        for name, parameter in model.named_parameters():  # drawing a batch trains nothing
            assert torch.equal(parameter, before[name]), name

    def test_the_batch_is_fixed_by_the_generator_alone(self, problem: Problem) -> None:
        model = seeded(problem)
        first = drawn(problem, model, 1)
        torch.manual_seed(12345)  # the global random state must not matter
        assert drawn(problem, model, 1) == first
        # Tiny fixtures may draw the same batch for two seeds, but not for every seed.
        assert any(drawn(problem, model, seed) != first for seed in range(2, 8))

    def test_a_rebuilt_problem_draws_the_same_batches(
        self, problem: Problem, rebuilt: Problem
    ) -> None:
        model = seeded(problem)
        assert drawn(rebuilt, model, 5) == drawn(problem, model, 5)

    # ---------------------------------------------------------------- evaluation

    @pytest.mark.parametrize("split", SPLITS)
    def test_evaluate_gives_every_task_a_finite_primary_metric(
        self, problem: Problem, split: str
    ) -> None:
        model = seeded(problem)
        results = problem.evaluate(model, split)  # type: ignore[arg-type]
        assert set(results) == set(problem.task_names)
        for task in problem.tasks:
            metrics = results[task.name]
            assert task.metric in metrics, task.name
            assert all(isinstance(key, str) for key in metrics)
            assert math.isfinite(metrics[task.metric]), task.name
        only = problem.evaluate(model, split, [problem.target])  # type: ignore[arg-type]
        assert set(only) == {problem.target}
        metric = problem.task(problem.target).metric
        assert close(only[problem.target][metric], results[problem.target][metric])

    def test_evaluate_is_deterministic_and_leaves_the_model_alone(self, problem: Problem) -> None:
        model = seeded(problem)
        before = state_of(model)
        for mode in (True, False):
            model.train(mode)
            first = problem.evaluate(model, "val")
            assert problem.evaluate(model, "val") == first
            assert all(module.training == mode for module in model.modules())
        assert_same_state(model, before)

    @pytest.mark.parametrize("split", SPLITS)
    def test_target_score_is_the_primary_metric_oriented_by_the_task(
        self, problem: Problem, split: str
    ) -> None:
        model = seeded(problem)
        score, metrics = target_score(problem, model, split)  # type: ignore[arg-type]
        task = problem.task(problem.target)
        value = metrics[task.metric]
        assert score == (value if task.higher_is_better else -value)
        assert task.score(metrics) == score

    # ---------------------------------------------------------------- optional capabilities

    def test_declared_capabilities_are_the_expected_ones(self, name: str, problem: Problem) -> None:
        # Pinned so that losing one (a slower, less exact merge search) is a visible change.
        declared = {c for c in CAPABILITIES if has_capability(problem, c)}
        assert declared == CAPABLE.get(name, set()), "update CAPABLE if this is deliberate"

    @pytest.mark.parametrize("split", SPLITS)
    def test_target_chunks_weigh_up_to_the_target_score(self, problem: Problem, split: str) -> None:
        if not has_capability(problem, "target_chunks"):
            pytest.skip(f"{problem.name} does not override target_chunks")
        model = seeded(problem)
        score, _ = target_score(problem, model, split)  # type: ignore[arg-type]
        examples = set()
        for chunks in (1, 2, 3):
            parts = problem.target_chunks(model, split, chunks)  # type: ignore[arg-type]
            assert isinstance(parts, Iterator)  # lazy: a pruned search stops reading early
            scored = list(parts)
            assert len(scored) == chunks
            assert all(n > 0 for _, n in scored)
            total = sum(n for _, n in scored)
            examples.add(total)
            assert close(sum(s * n for s, n in scored) / total, score), chunks
        assert len(examples) == 1  # every chunking covers the same examples

    @pytest.mark.parametrize("split", SPLITS)
    def test_target_example_scores_average_to_the_target_score(
        self, problem: Problem, split: str
    ) -> None:
        if not has_capability(problem, "target_example_scores"):
            pytest.skip(f"{problem.name} does not override target_example_scores")
        # Without a maximum the merge search cannot use the scores (it bounds the rest by it).
        assert problem.target_example_score_max is not None
        model = seeded(problem)
        before = state_of(model)
        score, _ = target_score(problem, model, split)  # type: ignore[arg-type]
        scores = problem.target_example_scores(model, split=split)  # type: ignore[arg-type]
        assert scores.dim() == 1 and len(scores) > 1
        assert close(scores.double().mean().item(), score)
        assert scores.max().item() <= problem.target_example_score_max
        index = torch.tensor([len(scores) - 1, 0, 1])
        some = problem.target_example_scores(model, index, split)  # type: ignore[arg-type]
        assert torch.equal(some, scores[index])
        assert_same_state(model, before)

    def test_target_loss_is_differentiable_and_matches_evaluate(self, problem: Problem) -> None:
        if not has_capability(problem, "target_loss"):
            pytest.skip(f"{problem.name} does not override target_loss")
        model = seeded(problem).train()
        before = state_of(model)
        loss = problem.target_loss(model, "val")
        assert loss.dim() == 0 and torch.isfinite(loss) and loss.requires_grad
        assert model.training  # evaluated in eval mode, the mode given back
        assert_same_state(model, before)  # eval mode: BatchNorm statistics untouched
        metrics = problem.evaluate(model, "val", [problem.target])[problem.target]
        if "loss" in metrics:
            assert math.isclose(loss.item(), metrics["loss"], rel_tol=1e-5)
        loss.backward()
        assert all(p.grad is not None for p in problem.shared_parameters(model))
