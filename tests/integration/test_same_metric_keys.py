"""Every door logs the same final keys for the same kind of run, and every run ends (issue 16).

The eight ways to start training — the commands ``run``, ``tune``, ``compare``,
``compare-methods``, ``bench`` (its tracked measurement) and the calls
``fm_optuna.train_forkmerge``, ``fm_optuna.compare_methods``, ``fm_optuna.tune`` — each train the
toy problem a few steps into one MLflow store, which is then read back: every ForkMerge run and
every baseline run carries exactly the ``final/*`` keys of the table in ``tracking/README.md``,
branch runs none, and every run (parents included) is FINISHED.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import fm_optuna
from fm_optuna import cli
from fm_optuna.config import ForkMergeConfig
from fm_optuna.tracking import open_store
from tests.conftest import ToyProblem
from tests.integration.test_tracking import (  # empty_store: the session's migrated store
    copy_store,
    empty_store,  # noqa: F401
)

pytestmark = pytest.mark.slow  # eight doors, ~20 tracked runs: tens of seconds

BENCHMARK = f"{__name__}:build"
CONFIG = ForkMergeConfig(
    total_steps=4, dt=2, branches=2, ranking="given", strategy="grid", grid_resolution=0.5
)
FLAGS = ["--benchmark", BENCHMARK, "--steps", "4", "--dt", "2", "--branches", "2"]
FLAGS += ["--ranking", "given", "--strategy", "grid", "--grid-resolution", "0.5"]
SPEC = """
[study]
name = "{name}"
n_trials = 2
seed = 0
storage = "sqlite:///{folder}/optuna.db"
checkpoint_dir = "{folder}/checkpoints"
[problem]
benchmark = "{benchmark}"
[training]
steps = 4
dt = 2
branches = 2
ranking = "given"
[search]
strategy = "grid"
grid_resolution = 0.5
[space]
dt = {{ low = 1, high = 2 }}
"""


def build(*, seed: int = 0, device: torch.device | None = None) -> ToyProblem:
    """The toy problem as a ``module:factory`` the command line and study files can name."""
    return ToyProblem()


def spec_file(folder: Path, name: str) -> Path:
    """A study file on the toy problem, its storage and checkpoints in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.toml"
    path.write_text(SPEC.format(name=name, folder=folder, benchmark=BENCHMARK))
    return path


def _command(*argv: str) -> None:
    code = cli.main(list(argv))
    assert code == 0, argv


def _doors(uri: str, tmp: Path) -> dict[str, Callable[[], object]]:
    """Door → what trains through it, logging to ``uri``; each door's runs in one experiment."""

    def bench() -> None:
        # The tracked measurement opens a temporary store: here, the test's (same experiment).
        def into_the_test_store(_: str | None = None, *, experiment: str, **options: Any) -> Any:
            return open_store(uri, experiment=experiment, **options)

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr("fm_optuna.tracking.open_store", into_the_test_store)
            _command("bench", *FLAGS, "--json")

    def spec(name: str) -> str:
        return str(spec_file(tmp / name, f"doors-{name}"))

    def command(*argv: str) -> Callable[[], None]:
        return lambda: _command(*argv, "--json", "--tracking-uri", uri)

    problem = ToyProblem()
    return {
        "run": command(
            "run", *FLAGS, "--checkpoint", str(tmp / "run.ckpt"), "--experiment", "doors/run"
        ),
        "tune": command("tune", spec("tune")),
        "compare": command(
            "compare", spec("compare"), "--strategies", "grid", "--seeds", "1", "--out", "compare"
        ),
        "compare-methods": command(
            "compare-methods", spec("methods"), "--methods", "stl,ew,forkmerge", "--out", "methods"
        ),
        "bench": bench,
        "train_forkmerge": lambda: fm_optuna.train_forkmerge(
            problem, CONFIG, tracking_uri=uri, experiment="doors/train_forkmerge"
        ),
        "compare_methods()": lambda: fm_optuna.compare_methods(
            problem, CONFIG, tracking_uri=uri, experiment="doors/compare_methods"
        ),
        "tune()": lambda: fm_optuna.tune(
            problem,
            {"dt": {"low": 1, "high": 2}},
            study_name="doors-api",
            config=CONFIG,
            storage=f"sqlite:///{tmp / 'api-optuna.db'}",
            n_trials=2,
            tracking_uri=uri,
            checkpoint_dir=str(tmp / "api-checkpoints"),
        ),
    }


EXPERIMENTS = {
    "run": "doors/run",
    "tune": "fm-optuna/study/doors-tune",
    "compare": "fm-optuna/compare/doors-compare",
    "compare-methods": "fm-optuna/compare-methods/doors-methods",
    "bench": "fm-optuna/bench",
    "train_forkmerge": "doors/train_forkmerge",
    "compare_methods()": "doors/compare_methods",
    "tune()": "fm-optuna/study/doors-api",
}


@pytest.fixture(scope="module")
def logged(
    empty_store: Path,  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, list[Any]]:
    """Door → every MLflow run it logged (one store for all eight)."""
    tmp = tmp_path_factory.mktemp("doors")
    uri = copy_store(empty_store, tmp / "tracking")
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.chdir(tmp)  # anything a door writes by default stays in the test's folder
        for door in _doors(uri, tmp).values():
            door()
    store = open_store(uri, experiment="doors/readback")
    runs: dict[str, list[Any]] = {}
    for door, name in EXPERIMENTS.items():
        experiment = store.client.get_experiment_by_name(name)
        assert experiment is not None, door
        runs[door] = store.client.search_runs([experiment.experiment_id], max_results=1000)
    return runs


def _final_keys(run: Any) -> frozenset[str]:
    return frozenset(key for key in run.data.metrics if key.startswith("final/"))


def _by_role(runs: dict[str, list[Any]], role: str) -> dict[str, set[frozenset[str]]]:
    """Door → the distinct sets of ``final/*`` keys of its runs of ``role``."""
    found = {
        door: {_final_keys(r) for r in door_runs if r.data.tags.get("fm_optuna.role") == role}
        for door, door_runs in runs.items()
    }
    return {door: keys for door, keys in found.items() if keys}


def expected_final_keys() -> frozenset[str]:
    """tracking/README.md's table for a completed run of the toy problem."""
    tasks = ToyProblem().task_names
    per_task = {f"final/{split}/{task}/mse" for split in ("val", "test") for task in tasks}
    return frozenset({"final/target_val", "final/target_test", "final/seconds", *per_task})


def test_every_door_logs_the_same_final_keys_for_a_forkmerge_run(
    logged: dict[str, list[Any]],
) -> None:
    found = _by_role(logged, "forkmerge")
    assert set(found) == set(EXPERIMENTS)  # every door trained ForkMerge
    assert found == {door: {expected_final_keys()} for door in EXPERIMENTS}


def test_a_baseline_run_logs_the_keys_of_a_forkmerge_run(logged: dict[str, list[Any]]) -> None:
    found = _by_role(logged, "baseline")
    assert set(found) == {"run", "compare-methods", "compare_methods()"}
    assert found == {door: {expected_final_keys()} for door in found}
    for door in found:
        methods = {r.data.tags["method"] for r in logged[door] if "method" in r.data.tags}
        assert methods == {"stl", "ew", "forkmerge"}, door


def test_branch_runs_have_no_final_keys(logged: dict[str, list[Any]]) -> None:
    found = _by_role(logged, "branch")
    assert set(found) == set(EXPERIMENTS)
    assert found == {door: {frozenset()} for door in EXPERIMENTS}


def test_runs_compared_with_stl_log_transfer_gains_outside_final(
    logged: dict[str, list[Any]],
) -> None:
    for door in ("run", "compare-methods", "compare_methods()"):
        for run in logged[door]:
            if run.data.tags.get("fm_optuna.role") in ("forkmerge", "baseline"):
                assert {"transfer/tg", "transfer/delta_m"} <= set(run.data.metrics), door


def test_every_run_of_every_door_ends_finished(logged: dict[str, list[Any]]) -> None:
    for door, runs in logged.items():
        assert runs, door
        assert {r.info.status for r in runs} == {"FINISHED"}, door
        for run in runs:
            if run.data.tags.get("fm_optuna.role") in ("forkmerge", "baseline"):
                assert run.data.tags["fm_optuna.status"] == "COMPLETE", door
                assert run.data.tags["target_metric"] == "mse", door
