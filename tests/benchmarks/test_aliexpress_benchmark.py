"""AliExpress benchmark: countries, labels, splits, batches, metrics and errors on a fixture."""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from fm_optuna import cli
from fm_optuna.benchmarks import aliexpress, build_problem
from fm_optuna.errors import ConfigError
from tests.conftest import run_tiny_forkmerge
from tests.datasets.test_datasets import write_aliexpress

ROWS = 400  # per CSV: 40 validation rows per country hold CTCVR positives (~15% of rows)
US_SHIFT = 100.0  # US's numerical_1 is shifted so a row tells its country


def write_all(root: Path, countries: Sequence[str] = aliexpress.COUNTRIES) -> Path:
    for country in countries:
        write_aliexpress(root, country, rows=ROWS)
    if "US" in countries:
        for split in ("train", "test"):
            edit(root, "US", split, lambda f: f.assign(numerical_1=f.numerical_1 + US_SHIFT))
    return root


def edit(
    root: Path, country: str, split: str, change: Callable[[pd.DataFrame], pd.DataFrame]
) -> None:
    path = root / f"AliExpress_{country}" / f"{split}.csv"
    change(pd.read_csv(path)).to_csv(path, index=False)


def csv(root: Path, country: str, split: str) -> pd.DataFrame:
    return pd.read_csv(root / f"AliExpress_{country}" / f"{split}.csv")


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_all(tmp_path_factory.mktemp("aliexpress"))


def problem_of(data_dir: Path, **options: object) -> aliexpress.AliExpressProblem:
    defaults: dict[str, object] = {"batch_size": 32, "embed_dim": 4, "data_dir": str(data_dir)}
    return build_problem("aliexpress", **{**defaults, **options})  # type: ignore[return-value]


def rows_of(numerical: torch.Tensor) -> set[tuple[float, ...]]:
    return {tuple(round(v, 3) for v in row) for row in numerical.tolist()}


class Scores(nn.Module):
    """Every requested task's logit is the first numerical feature; records each forward."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(()))
        self.calls: list[tuple[tuple[str, ...], torch.Tensor]] = []

    def forward(
        self, categorical: torch.Tensor, numerical: torch.Tensor, tasks: Sequence[str]
    ) -> torch.Tensor:
        self.calls.append((tuple(tasks), numerical.clone()))
        return numerical[:, :1].expand(-1, len(tasks)) + self.bias


class TestTasksAndTargets:
    def test_targets_cover_every_country_and_kind(self) -> None:
        assert len(aliexpress.TARGETS) == 8
        assert aliexpress.DEFAULT_TARGET == "NL_ctcvr" in aliexpress.TARGETS
        assert {"ES_ctr", "FR_ctcvr", "US_ctr"} <= set(aliexpress.TARGETS)

    def test_all_countries_give_eight_higher_is_better_auc_tasks(self, root: Path) -> None:
        problem = problem_of(root)
        assert problem.target == "NL_ctcvr"
        assert problem.task_names == aliexpress.TARGETS
        assert all(task.metric == "auc" and task.higher_is_better for task in problem.tasks)
        assert len(problem.auxiliaries) == 7

    def test_a_subset_of_countries_in_canonical_order(self, tmp_path: Path) -> None:
        write_all(tmp_path, ("NL", "US"))
        for countries in (["US", "NL"], "US, NL", ("NL", "US")):
            problem = problem_of(tmp_path, countries=countries, target="US_ctr")
            assert problem.task_names == ("NL_ctr", "NL_ctcvr", "US_ctr", "US_ctcvr")
            assert problem.target == "US_ctr"
            assert problem.describe()["countries"] == "NL,US"


class TestData:
    def test_ctcvr_is_click_and_conversion(self, tmp_path: Path) -> None:
        write_all(tmp_path, ("NL",))
        # A conversion without a click (not in the real data) must not count as a CTCVR positive.
        edit(tmp_path, "NL", "test", lambda f: f.assign(click=0, conversion=1 - f.click))
        problem = problem_of(tmp_path, countries=["NL"])
        rows = problem._rows["test"]["NL"]
        frame = csv(tmp_path, "NL", "test")
        assert torch.equal(rows["ctr"], torch.zeros(ROWS))
        assert torch.equal(rows["ctcvr"], torch.zeros(ROWS))
        assert frame["conversion"].sum() > 0
        train = problem._rows["train"]["NL"]
        assert (train["ctcvr"] <= train["ctr"]).all() and train["ctcvr"].sum() > 0

    def test_test_is_test_csv_and_validation_is_carved_from_train(self, root: Path) -> None:
        problem = problem_of(root, val_fraction=0.25)
        for country in aliexpress.COUNTRIES:
            test = problem._rows["test"][country]
            frame = csv(root, country, "test")
            assert torch.equal(test["ctr"], torch.tensor(frame["click"].to_numpy(np.float32)))
            assert rows_of(test["numerical"]) == rows_of(
                torch.tensor(frame[["numerical_1", "numerical_2"]].to_numpy(np.float32))
            )
            train = rows_of(problem._rows["train"][country]["numerical"])
            val = rows_of(problem._rows["val"][country]["numerical"])
            whole = csv(root, country, "train")[["numerical_1", "numerical_2"]]
            assert not train & val
            assert train | val == rows_of(torch.tensor(whole.to_numpy(np.float32)))
            assert problem.split_sizes()[country] == {"train": 300, "val": 100, "test": ROWS}

    def test_the_split_is_fixed_by_data_seed_and_independent_of_other_countries(
        self, root: Path
    ) -> None:
        def val_rows(**options: object) -> set[tuple[float, ...]]:
            return rows_of(problem_of(root, **options)._rows["val"]["NL"]["numerical"])

        assert val_rows() == val_rows(countries=["NL"]) == val_rows(countries="NL,FR")
        assert val_rows() != val_rows(data_seed=1)

    def test_limit_reads_the_first_rows_of_each_csv(self, root: Path) -> None:
        problem = problem_of(root, limit=50, countries=["NL", "US"], target="US_ctr")
        for country in ("NL", "US"):
            assert problem.split_sizes()[country] == {"train": 45, "val": 5, "test": 50}
            train = csv(root, country, "train")[["numerical_1", "numerical_2"]].head(50)
            seen = rows_of(problem._rows["train"][country]["numerical"]) | rows_of(
                problem._rows["val"][country]["numerical"]
            )
            assert seen == rows_of(torch.tensor(train.to_numpy(np.float32)))
        assert problem.describe()["limit"] == 50

    def test_embeddings_cover_codes_seen_only_in_test(self, tmp_path: Path) -> None:
        write_all(tmp_path, ("NL", "US"))

        def big_code(frame: pd.DataFrame) -> pd.DataFrame:
            frame.loc[3, "categorical_2"] = 40
            return frame

        edit(tmp_path, "US", "test", big_code)
        problem = problem_of(tmp_path, countries=["NL", "US"])
        assert problem.field_dims == [5, 41, 3]
        dims = torch.tensor(problem.field_dims)
        for split in ("train", "val", "test"):
            for rows in problem._rows[split].values():
                assert ((rows["categorical"] >= 0) & (rows["categorical"] < dims)).all()
        model = problem.make_model()
        assert math.isfinite(problem.evaluate(model, "test", ["US_ctr"])["US_ctr"]["loss"])


class TestTraining:
    def test_one_batch_per_country_shared_by_its_tasks(self, root: Path) -> None:
        problem = problem_of(root)
        model = Scores()
        losses = problem.task_losses(
            model, ["NL_ctr", "US_ctcvr", "NL_ctcvr"], torch.Generator().manual_seed(0)
        )
        assert list(losses) == ["NL_ctr", "US_ctcvr", "NL_ctcvr"]
        assert [tasks for tasks, _ in model.calls] == [("NL_ctr", "NL_ctcvr"), ("US_ctcvr",)]
        (_, nl), (_, us) = model.calls
        assert len(nl) == len(us) == 32
        assert (nl[:, 0] < US_SHIFT / 2).all() and (
            us[:, 0] > US_SHIFT / 2
        ).all()  # each from its country
        assert rows_of(nl) <= rows_of(problem._rows["train"]["NL"]["numerical"])

    def test_losses_are_finite_scalars_with_grad_and_seeded(self, root: Path) -> None:
        problem = problem_of(root)
        torch.manual_seed(0)
        model = problem.make_model()
        for tasks in (problem.task_names, (problem.target,), ("FR_ctr", "ES_ctcvr")):
            losses = problem.task_losses(model, tasks, torch.Generator().manual_seed(0))
            assert list(losses) == list(tasks)
            assert all(loss.dim() == 0 and torch.isfinite(loss) for loss in losses.values())
            assert all(loss.requires_grad for loss in losses.values())

        def drawn(seed: int) -> dict[str, float]:
            generator = torch.Generator().manual_seed(seed)
            losses = problem.task_losses(model, problem.task_names, generator)
            return {task: loss.item() for task, loss in losses.items()}

        assert drawn(1) == drawn(1) != drawn(2)

    def test_a_country_pair_uses_the_same_batch_alone_or_together(self, root: Path) -> None:
        problem = problem_of(root)
        torch.manual_seed(0)
        model = problem.make_model()
        both = problem.task_losses(model, ["NL_ctr", "NL_ctcvr"], torch.Generator().manual_seed(3))
        alone = problem.task_losses(model, ["NL_ctcvr"], torch.Generator().manual_seed(3))
        assert both["NL_ctcvr"].item() == pytest.approx(alone["NL_ctcvr"].item())

    def test_towers_are_task_specific_for_the_gradient_methods(self, root: Path) -> None:
        problem = problem_of(root)
        model = problem.make_model()
        shared = {id(p) for p in problem.shared_parameters(model)}
        towers = {id(p) for p in model.towers.parameters()}
        assert shared and towers and not shared & towers
        assert {id(p) for p in model.embedding.parameters()} <= shared
        assert set(model.towers) == set(problem.task_names)

    def test_esmm_ctcvr_never_exceeds_ctr(self, root: Path) -> None:
        problem = problem_of(root, model="esmm")
        model = problem.make_model().eval()
        rows = problem._rows["val"]["FR"]
        with torch.no_grad():
            logits = model(rows["categorical"], rows["numerical"], ["FR_ctr", "FR_ctcvr"])
        assert (logits[:, 1] <= logits[:, 0] + 1e-5).all()


class TestEvaluate:
    def test_auc_and_loss_match_a_hand_computation(self, root: Path) -> None:
        problem = problem_of(root)
        results = problem.evaluate(Scores(), "val", ["NL_ctcvr", "US_ctr"])
        assert list(results) == ["NL_ctcvr", "US_ctr"]
        for task, (country, kind) in (("NL_ctcvr", ("NL", "ctcvr")), ("US_ctr", ("US", "ctr"))):
            rows = problem._rows["val"][country]
            scores = rows["numerical"][:, 0].double().tolist()
            labels = rows[kind].tolist()
            positives = [s for s, y in zip(scores, labels, strict=True) if y == 1]
            negatives = [s for s, y in zip(scores, labels, strict=True) if y == 0]
            wins = sum((p > n) + 0.5 * (p == n) for p in positives for n in negatives)
            expected_auc = wins / (len(positives) * len(negatives))
            expected_loss = -sum(
                y * math.log(1 / (1 + math.exp(-s))) + (1 - y) * math.log(1 / (1 + math.exp(s)))
                for s, y in zip(scores, labels, strict=True)
            ) / len(scores)
            assert results[task]["auc"] == pytest.approx(expected_auc)
            assert results[task]["loss"] == pytest.approx(expected_loss, rel=1e-5)

    def test_evaluate_is_deterministic_and_leaves_the_model_alone(self, root: Path) -> None:
        problem = problem_of(root)
        model = problem.make_model()
        before = copy.deepcopy(model.state_dict())
        for mode in (True, False):
            model.train(mode)
            results = problem.evaluate(model, "val")
            assert results == problem.evaluate(model, "val")
            assert list(results) == list(problem.task_names)
            for metrics in results.values():
                assert set(metrics) == {"auc", "loss"}
                assert 0.0 <= metrics["auc"] <= 1.0 and metrics["loss"] > 0.0
            assert all(module.training == mode for module in model.modules())
        assert set(problem.evaluate(model, "test", ["ES_ctr"])) == {"ES_ctr"}
        for key, value in model.state_dict().items():
            assert torch.equal(value, before[key]), key
        with pytest.raises(ConfigError, match="split"):
            problem.evaluate(model, "train")  # type: ignore[arg-type]

    def test_describe_is_flat(self, root: Path) -> None:
        description = problem_of(root).describe()
        assert description["benchmark"] == "aliexpress"
        assert description["target"] == "NL_ctcvr" and description["limit"] == "all"
        assert description["NL_val"] == 40
        assert all(isinstance(v, int | float | str | bool) for v in description.values())


class TestErrors:
    def test_data_dir_is_required(self) -> None:
        with pytest.raises(ConfigError, match=r"`data_dir` is required.*AliExpress_<country>"):
            build_problem("aliexpress", batch_size=32)

    def test_a_missing_folder_names_data_dir(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigError, match="`data_dir = ") as error:
            problem_of(tmp_path / "nowhere")
        assert "countries" not in str(error.value)

    def test_missing_countries_are_listed_with_the_way_out(self, tmp_path: Path) -> None:
        write_all(tmp_path, ("NL",))
        with pytest.raises(ConfigError, match=r"`data_dir`.*missing: AliExpress_ES/train\.csv"):
            problem_of(tmp_path)
        with pytest.raises(ConfigError, match="Set `countries`"):
            problem_of(tmp_path)
        assert problem_of(tmp_path, countries=["NL"]).task_names == ("NL_ctr", "NL_ctcvr")
        (tmp_path / "AliExpress_NL" / "test.csv").unlink()
        with pytest.raises(ConfigError, match=r"missing: AliExpress_NL/test\.csv"):
            problem_of(tmp_path, countries=["NL"])

    def test_countries_with_different_columns(self, tmp_path: Path) -> None:
        write_all(tmp_path, ("NL", "US"))
        edit(tmp_path, "US", "train", lambda frame: frame.drop(columns="numerical_2"))
        with pytest.raises(ConfigError, match="same categorical and numerical columns"):
            problem_of(tmp_path, countries=["NL", "US"])

    @pytest.mark.parametrize("limit", [None, 10])
    def test_a_csv_without_labels_is_named(self, tmp_path: Path, limit: int | None) -> None:
        write_all(tmp_path, ("NL",))
        edit(tmp_path, "NL", "test", lambda frame: frame.drop(columns="click"))
        real = str(tmp_path / "AliExpress_NL" / "test.csv")
        with pytest.raises(ConfigError, match="expected the columns") as error:
            problem_of(tmp_path, countries=["NL"], limit=limit)
        assert str(error.value).startswith(real)

    def test_a_target_without_validation_positives(self, tmp_path: Path) -> None:
        write_all(tmp_path, ("NL",))
        edit(tmp_path, "NL", "train", lambda frame: frame.assign(conversion=0))
        with pytest.raises(ConfigError, match=r"only one class.*raise `limit`"):
            problem_of(tmp_path, countries=["NL"])
        assert problem_of(tmp_path, countries=["NL"], target="NL_ctr").target == "NL_ctr"

    def test_a_limit_too_small_to_carve_validation(self, root: Path) -> None:
        with pytest.raises(ConfigError, match=r"val_fraction.*raise `limit`"):
            problem_of(root, limit=3, countries=["NL"])

    @pytest.mark.parametrize(
        ("options", "parameter"),
        [
            ({"batch_size": 0}, "batch_size"),
            ({"embed_dim": -1}, "embed_dim"),
            ({"limit": 0}, "limit"),
            ({"limit": 2.5}, "limit"),
            ({"data_seed": -1}, "data_seed"),
            ({"val_fraction": 0.7}, "val_fraction"),
            ({"val_fraction": "a"}, "val_fraction"),
            ({"model": "mmoe"}, "model"),
            ({"countries": ["DE"]}, "countries"),
            ({"countries": []}, "countries"),
            ({"countries": ["NL", "NL"]}, "countries"),
            ({"countries": 3}, "countries"),
            ({"countries": ["ES"]}, "countries.*target's country NL"),
            ({"target": "nl_ctcvr"}, "target"),
            ({"negatives": 4}, "negatives"),
        ],
    )
    def test_bad_options(self, root: Path, options: dict[str, object], parameter: str) -> None:
        with pytest.raises(ConfigError, match=parameter):
            problem_of(root, **options)


def test_a_tiny_forkmerge_run(root: Path) -> None:
    run_tiny_forkmerge(problem_of(root, countries=["NL", "US"]))


def test_the_command_line_runs_on_a_data_dir(
    root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    common = ["run", "--benchmark", "aliexpress", "--steps", "4", "--dt", "2", "--branches", "2"]
    common += ["--ranking", "given", "--strategy", "grid", "--grid-resolution", "0.5"]
    common += ["--batch-size", "32", "--json", "--no-tracking"]
    code = cli.main([*common, "--data-dir", str(root), "--checkpoint", str(tmp_path / "fm.ckpt")])
    out = capsys.readouterr()
    assert code == 0, out.err[-2000:]
    payload = json.loads(out.out)
    assert [row["method"] for row in payload["results"]] == ["stl", "ew", "forkmerge"]
    for row in payload["results"]:
        assert 0.0 <= row["target_test"] <= 1.0
    merges = payload["forkmerge"]["merges"]
    assert [merge["step"] for merge in merges] == [2, 4]
    assert all(abs(sum(merge["lambda"]) - 1.0) < 1e-9 for merge in merges)

    assert cli.main([*common, "--checkpoint", str(tmp_path / "x.ckpt")]) == cli.EXIT_USAGE
    assert "`data_dir` is required" in capsys.readouterr().err
