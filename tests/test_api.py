"""The public API: the package top, train_forkmerge, compare_methods, tune, search_merge."""

from __future__ import annotations

from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

import optuna
import pytest
import torch
from torch import nn

import fm_optuna
from tests.conftest import ToyProblem

SMALL = fm_optuna.ForkMergeConfig(
    dt=2, total_steps=4, branches=2, strategy="grid", grid_resolution=0.5, ranking="given"
)


def _runs(uri: str) -> list[object]:
    from fm_optuna.tracking import open_store

    client = open_store(uri, experiment="Default").client  # open_store: SQLAlchemy's warning muted
    experiments = client.search_experiments()
    return client.search_runs([e.experiment_id for e in experiments])


def test_the_package_top_is_documented_and_complete() -> None:
    assert fm_optuna.__version__ == metadata.version("fm-optuna")
    for name in fm_optuna.__all__:
        assert getattr(fm_optuna, name) is not None
    assert set(fm_optuna.__all__) <= set(dir(fm_optuna))
    assert "train_forkmerge" in (fm_optuna.__doc__ or "")
    for required in ("name", "tasks", "target", "device", "make_model", "task_losses"):
        assert required in (fm_optuna.Problem.__doc__ or "")


def test_train_forkmerge_returns_the_trajectory_and_finishes_its_runs(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    result = fm_optuna.train_forkmerge(ToyProblem(), SMALL, tracking_uri=uri)
    assert result.steps == [2, 4] and len(result.lambda_history) == 2
    assert isinstance(result.model, nn.Module)
    runs = _runs(uri)
    assert {run.data.tags["fm_optuna.role"] for run in runs} == {"forkmerge", "branch"}
    assert {run.info.status for run in runs} == {"FINISHED"}
    parent = next(run for run in runs if run.data.tags["fm_optuna.role"] == "forkmerge")
    assert {"lambda/target", "lambda/all"} <= set(parent.data.metrics)
    assert parent.data.tags["fm_optuna.status"] == "COMPLETE"


def test_mlflow_tracking_uri_is_honoured_and_nothing_is_logged_without(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    fm_optuna.train_forkmerge(ToyProblem(), SMALL)
    assert list(tmp_path.iterdir()) == []
    uri = f"sqlite:///{tmp_path}/env.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    fm_optuna.train_forkmerge(ToyProblem(), SMALL, experiment="mine")
    assert {run.info.status for run in _runs(uri)} == {"FINISHED"}


class BreaksAtStepThree(ToyProblem):
    calls = 0

    def task_losses(
        self, model: nn.Module, tasks: Sequence[str], generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        self.calls += 1
        if self.calls > 6:  # the check's draw and a few training steps pass
            raise RuntimeError("out of data")
        return super().task_losses(model, tasks, generator)


def test_a_run_that_raises_ends_failed(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with pytest.raises(RuntimeError, match="out of data"):
        fm_optuna.train_forkmerge(BreaksAtStepThree(), SMALL, tracking_uri=uri)
    parent = next(r for r in _runs(uri) if r.data.tags["fm_optuna.role"] == "forkmerge")
    assert parent.info.status == "FAILED" and parent.data.tags["fm_optuna.status"] == "FAIL"


def test_a_broken_problem_is_a_config_error_before_any_store(tmp_path: Path) -> None:
    problem = ToyProblem()
    problem.target = "t9"
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with pytest.raises(fm_optuna.ConfigError, match="Problem `toy`: the target should be one"):
        fm_optuna.train_forkmerge(problem, SMALL, tracking_uri=uri)
    with pytest.raises(fm_optuna.ConfigError, match="Problem `toy`: the target"):
        fm_optuna.tune(
            problem, {}, study_name="s", storage=f"sqlite:///{tmp_path}/optuna.db", n_trials=1
        )
    assert list(tmp_path.iterdir()) == []  # no store, no study, no FAIL trial


def test_tune_takes_optuna_objects_resumes_and_validates_against_the_problem(
    tmp_path: Path,
) -> None:
    storage = f"sqlite:///{tmp_path}/optuna.db"
    common = dict(
        study_name="toy",
        config=SMALL,
        storage=storage,
        sampler=optuna.samplers.RandomSampler(seed=3),
        pruner=optuna.pruners.NopPruner(),
        checkpoint_dir=str(tmp_path / "ckpt"),
        tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
    )
    space = {"dt": {"low": 1, "high": 4}, "branches": {"low": 2, "high": 4}}
    report = fm_optuna.tune(ToyProblem(), space, n_trials=2, **common)  # type: ignore[arg-type]
    assert [t.state for t in report.trials] == ["COMPLETE", "COMPLETE"]
    assert report.best_params is not None and set(report.best_params) == {"dt", "branches"}
    report = fm_optuna.tune(ToyProblem(), space, n_trials=3, **common)  # type: ignore[arg-type]
    assert len(report.trials) == 3
    study = optuna.load_study(study_name="toy", storage=storage)
    assert isinstance(study.sampler, optuna.samplers.TPESampler)  # load_study's own default
    assert all("lambda_history" in t.user_attrs for t in study.trials)
    runs = _runs(f"sqlite:///{tmp_path}/mlflow.db")
    trial_runs = [r for r in runs if r.data.tags["fm_optuna.role"] != "study"]
    assert len(trial_runs) > 3 and {r.info.status for r in trial_runs} == {"FINISHED"}
    assert [r.data.tags["fm_optuna.role"] for r in runs].count("study") == 1  # stays open
    with pytest.raises(fm_optuna.ConfigError, match=r"space\.branches\.high.*the tasks of toy"):
        fm_optuna.tune(ToyProblem(), {"branches": {"low": 2, "high": 5}}, **common)  # type: ignore[arg-type]
    with pytest.raises(fm_optuna.ConfigError, match=r"unknown key `space.depth`"):
        fm_optuna.tune(ToyProblem(), {"depth": 3}, **common)  # type: ignore[arg-type]


def test_compare_methods_on_a_problem() -> None:
    report = fm_optuna.compare_methods(ToyProblem(), SMALL, methods=("stl", "ew", "forkmerge"))
    rows = {row["method"]: row for row in report.rows()}
    assert set(rows) == {"stl", "ew", "forkmerge"} and rows["stl"]["tg_mean"] == 0.0


def test_search_merge_on_any_evaluate() -> None:
    decision = fm_optuna.search_merge(lambda lam: -abs(lam[0] - 0.3), 2, strategy="grid")
    assert [round(w, 1) for w in decision.weights] == [0.3, 0.7]
    decision = fm_optuna.search_merge(
        lambda lam: float(-((lam - [0.2, 0.3, 0.5]) ** 2).sum()), 3, strategy="tpe", budget=30
    )
    assert sum(decision.weights) == pytest.approx(1.0) and decision.score > -0.1
    with pytest.raises(fm_optuna.ConfigError, match="branch_scores"):
        fm_optuna.search_merge(lambda lam: 0.0, 2, branch_scores=[1.0])


def test_tune_checks_every_option_against_the_problem_before_the_study_opens(
    tmp_path: Path,
) -> None:
    storage = tmp_path / "optuna.db"
    config = fm_optuna.ForkMergeConfig(dt=10, total_steps=20, keep=(0, 1, 7))
    with pytest.raises(fm_optuna.ConfigError, match="keep"):
        fm_optuna.tune(
            ToyProblem(),
            {"dt": {"low": 5, "high": 10}},
            study_name="keep",
            storage=f"sqlite:///{storage}",
            config=config,
            checkpoint_dir=str(tmp_path / "ck"),
        )
    assert not storage.exists() and not (tmp_path / "ck").exists()
    with pytest.raises(fm_optuna.ConfigError, match="n_trials"):
        fm_optuna.tune(ToyProblem(), {}, study_name="n", storage=f"sqlite:///{storage}", n_trials=0)
    assert not storage.exists()
