"""MovieLens-CTR: the impressions, the labels, the scenarios and the problem's contract."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from fm_optuna.benchmarks import build_problem, movielens
from fm_optuna.errors import ConfigError

RATINGS = 100_000


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("fm_optuna_cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FM_OPTUNA_CACHE", str(root))
        movielens.impressions.cache_clear()
        yield root
        movielens.impressions.cache_clear()


def problem_of(**options: object) -> movielens.MovieLensProblem:
    return build_problem("movielens", **{"batch_size": 64, **options})  # type: ignore[return-value]


def pairs(data: dict[str, torch.Tensor], rows: torch.Tensor | slice) -> torch.Tensor:
    categorical = data["categorical"][rows]
    return categorical[:, 0] * 10_000 + categorical[:, 1]


class TestImpressions:
    def test_labels(self) -> None:
        data = movielens.impressions(4, 0)
        click, conversion = data["click"], data["conversion"]
        assert int(click.sum()) == RATINGS
        assert click[:RATINGS].all() and not click[RATINGS:].any()
        assert (conversion <= click).all()
        # A bit over half of MovieLens's ratings are 4 or 5.
        assert 0.5 < conversion.sum().item() / RATINGS < 0.6

    def test_negatives_are_unseen_and_unique_per_user(self) -> None:
        data = movielens.impressions(4, 0)
        keys = pairs(data, slice(None))
        assert len(torch.unique(keys)) == len(keys)
        users = data["categorical"][:, 0]
        positives = torch.bincount(users[:RATINGS], minlength=944)
        negatives = torch.bincount(users[RATINGS:], minlength=944)
        assert (negatives <= 4 * positives).all()
        # Only the heaviest raters run out of unseen movies.
        assert (negatives == 4 * positives).float().mean() > 0.9
        assert len(keys) > 4.5 * RATINGS

    def test_fixed_by_the_data_seed(self) -> None:
        first = movielens.impressions(1, 0)
        assert len(first["click"]) == 2 * RATINGS
        assert torch.equal(
            pairs(first, slice(None)), pairs(movielens.impressions(1, 0), slice(None))
        )
        assert not torch.equal(
            pairs(first, slice(None)), pairs(movielens.impressions(1, 5), slice(None))
        )

    def test_features_fit_their_fields(self) -> None:
        data = movielens.impressions(4, 0)
        dims = data["field_dims"]
        assert len(dims) == len(movielens.CATEGORICAL)
        assert (data["categorical"] >= 0).all()
        assert (data["categorical"] < dims).all()
        assert data["numerical"].shape[1] == 21 and torch.isfinite(data["numerical"]).all()


class TestProblem:
    def test_every_target_builds_and_picks_its_grouping(self) -> None:
        for grouping, groups in movielens.GROUPINGS.items():
            for group in groups:
                for kind in movielens.KINDS:
                    problem = problem_of(target=f"{group}_{kind}")
                    assert problem.describe()["grouping"] == grouping
                    assert problem.task_names == tuple(
                        f"{g}_{k}" for g in groups for k in movielens.KINDS
                    )
                    assert all(t.metric == "auc" and t.higher_is_better for t in problem.tasks)
        assert len(movielens.TARGETS) == 2 * (4 + 2 + 1)

    def test_scenarios_partition_the_impressions_and_splits_are_disjoint(self) -> None:
        problem = problem_of()
        data = movielens.impressions(4, 0)
        sizes = problem.split_sizes()
        assert sum(sum(s.values()) for s in sizes.values()) == len(data["click"])
        for group in problem.groups:
            keys = {
                split: set(pairs(problem._rows[split][group], slice(None)).tolist())
                for split in ("train", "val", "test")
            }
            assert not keys["train"] & keys["val"] and not keys["train"] & keys["test"]
            assert not keys["val"] & keys["test"]
            assert 0.08 < sizes[group]["val"] / sum(sizes[group].values()) < 0.12

    def test_age_bands(self) -> None:
        problem = problem_of()
        bucket = {"lt25": {0, 1}, "25to34": {2}, "35to44": {3}, "ge45": {4, 5, 6}}
        for group, buckets in bucket.items():
            seen = set(problem._rows["train"][group]["categorical"][:, 3].tolist())
            assert seen <= buckets, group

    def test_one_batch_per_scenario_serves_both_tasks(self) -> None:
        problem = problem_of()
        torch.manual_seed(0)
        model = problem.make_model()
        both = problem.task_losses(
            model, ["ge45_click", "ge45_conversion"], torch.Generator().manual_seed(2)
        )
        alone = problem.task_losses(model, ["ge45_conversion"], torch.Generator().manual_seed(2))
        assert both["ge45_conversion"].item() == pytest.approx(alone["ge45_conversion"].item())

    def test_losses_are_finite_scalars_with_grad_and_seeded(self) -> None:
        problem = problem_of()
        torch.manual_seed(0)
        model = problem.make_model()
        for tasks in (problem.task_names, (problem.target,)):
            losses = problem.task_losses(model, tasks, torch.Generator().manual_seed(0))
            assert list(losses) == list(tasks)
            assert all(loss.dim() == 0 and torch.isfinite(loss) for loss in losses.values())
            assert all(loss.requires_grad for loss in losses.values())

        def drawn(seed: int) -> dict[str, float]:
            generator = torch.Generator().manual_seed(seed)
            losses = problem.task_losses(model, problem.task_names, generator)
            return {task: loss.item() for task, loss in losses.items()}

        assert drawn(1) == drawn(1) != drawn(2)

    def test_evaluate_is_deterministic_and_leaves_the_model_alone(self) -> None:
        problem = problem_of()
        model = problem.make_model()
        before = copy.deepcopy(model.state_dict())
        for mode in (True, False):
            model.train(mode)
            results = problem.evaluate(model, "val")
            assert results == problem.evaluate(model, "val")
            assert set(results) == set(problem.task_names)
            for metrics in results.values():
                assert 0.0 <= metrics["auc"] <= 1.0 and metrics["loss"] > 0.0
            assert all(module.training == mode for module in model.modules())
        assert set(problem.evaluate(model, "test", ["lt25_click"])) == {"lt25_click"}
        for key, value in model.state_dict().items():
            assert torch.equal(value, before[key]), key

    @pytest.mark.parametrize("model", movielens.MODELS)
    def test_training_raises_the_target_auc(self, model: str) -> None:
        problem = problem_of(model=model, batch_size=256)
        torch.manual_seed(0)
        net = problem.make_model()
        optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
        target = problem.target
        before = problem.evaluate(net, "val", [target])[target]
        generator = torch.Generator().manual_seed(0)
        for _ in range(60):
            losses = problem.task_losses(net, ["ge45_click", target], generator)
            optimizer.zero_grad()
            sum(losses.values()).backward()  # type: ignore[union-attr]
            optimizer.step()
        after = problem.evaluate(net, "val", [target])[target]
        assert after["auc"] > before["auc"] + 0.1
        assert after["loss"] < before["loss"]

    def test_esmm_conversion_never_exceeds_click(self) -> None:
        problem = problem_of(model="esmm")
        model = problem.make_model().eval()
        rows = problem._rows["val"]["lt25"]
        with torch.no_grad():
            logits = model(
                rows["categorical"], rows["numerical"], ["lt25_click", "lt25_conversion"]
            )
        assert (logits[:, 1] <= logits[:, 0] + 1e-5).all()

    def test_describe_is_flat(self) -> None:
        description = problem_of().describe()
        assert description["benchmark"] == "movielens"
        assert description["target"] == movielens.DEFAULT_TARGET
        assert all(isinstance(v, int | float | str | bool) for v in description.values())

    @pytest.mark.parametrize(
        ("options", "parameter"),
        [
            ({"batch_size": -1}, "batch_size"),
            ({"data_seed": -1}, "data_seed"),
            ({"negatives": 0}, "negatives"),
            ({"val_fraction": 0.7}, "val_fraction"),
            ({"test_fraction": "a"}, "test_fraction"),
            ({"model": "mmoe"}, "model"),
            ({"target": "nope"}, "target"),
        ],
    )
    def test_bad_options(self, options: dict[str, object], parameter: str) -> None:
        with pytest.raises(ConfigError, match=parameter):
            problem_of(**options)


def test_towers_are_task_specific_for_the_gradient_methods() -> None:
    problem = build_problem("movielens", batch_size=64)
    model = problem.make_model()
    shared = {id(p) for p in problem.shared_parameters(model)}
    towers = {id(p) for p in model.towers.parameters()}
    assert shared and towers and not shared & towers
    assert {id(p) for p in model.embedding.parameters()} <= shared
