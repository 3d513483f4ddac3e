"""compare-methods end to end: TG, Δm and negative-transfer flags on the toy problem; the CLI."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fm_optuna import cli
from fm_optuna.baselines import BASELINES
from fm_optuna.core._events import Observer, RunFinished, RunStarted, TransferMeasured
from fm_optuna.core._loop import ForkMergeConfig
from fm_optuna.experiments._compare_methods import compare_methods, parse_methods
from fm_optuna.experiments._run_methods import (
    Retargeted,
    relative_improvement,
    run_methods,
    stl_reference,
)
from tests.conftest import ToyProblem

CONFIG = ForkMergeConfig(dt=5, total_steps=10, lr=1e-2, strategy="grid", branches=2, seed=0)
METHODS = ("stl", "ew", "uw", "pcgrad", "ptft", "forkmerge")


class Recorder(Observer):
    def __init__(self) -> None:
        self.started: list[str] = []
        self.finished: list[RunFinished] = []
        self.measured: list[TransferMeasured] = []

    def on_run_started(self, event: RunStarted) -> None:
        self.started.append(event.run)

    def on_run_finished(self, event: RunFinished) -> None:
        self.finished.append(event)

    def on_transfer_measured(self, event: TransferMeasured) -> None:
        self.measured.append(event)


@pytest.fixture(scope="module")
def report() -> Any:
    problem = ToyProblem(noise_task=True)
    problems = [problem, Retargeted(problem, "t1")]
    recorders: dict[tuple[str, int], Recorder] = {}

    def observers(target: str, seed: int) -> list[Observer]:
        recorders[target, seed] = Recorder()
        return [recorders[target, seed]]

    finished: list[tuple[str, int, str]] = []
    result = compare_methods(
        problems,
        CONFIG,
        METHODS,
        seeds=[0, 1],
        observers=observers,
        on_method=lambda target, seed, method, _: finished.append((target, seed, method)),
    )
    return result, recorders, finished


def test_every_method_runs_for_every_target_and_seed(report: Any) -> None:
    result, recorders, finished = report
    assert set(recorders) == {("t0", 0), ("t0", 1), ("t1", 0), ("t1", 1)}
    for recorder in recorders.values():
        # STL first: its model is the target's reference; the reference runs emit nothing.
        assert recorder.started == ["stl", "ew", "uw", "pcgrad", "ptft", "forkmerge"]
        assert [e.run for e in recorder.finished] == recorder.started
        assert {e.status for e in recorder.finished} == {"COMPLETE"}
        # TG and Δm follow each run's end, for the tracker to log.
        assert [e.run for e in recorder.measured] == recorder.started
        for event in recorder.measured:
            assert isinstance(event.tg, float) and isinstance(event.delta_m, float)
    assert len(finished) == 4 * len(METHODS)
    assert [row["method"] for row in result.rows()] == [*METHODS, *METHODS]


def test_tg_delta_m_and_flags_follow_the_definitions(report: Any) -> None:
    result, _, _ = report
    problem = ToyProblem(noise_task=True)
    for run in result.runs:
        comparison = run.comparison
        references = comparison.reference_metrics
        assert set(references) == set(problem.task_names)
        for method in comparison.results:
            if method.kind == "single-task":
                assert method.tg == 0.0 and method.delta_m == 0.0 and not method.wnt
                continue
            tasks = problem.task_names if method.kind == "multi-task" else (run.target,)
            assert tuple(method.relative) == tasks
            for task in tasks:
                ours, stl = method.test[task]["mse"], references[task]["mse"]
                assert method.tg_tasks[task] == pytest.approx(stl - ours)  # lower is better
                assert method.relative[task] == pytest.approx(-(ours - stl) / stl)
                assert method.wnt[task] == (ours > stl)
            assert method.delta_m == pytest.approx(sum(method.relative.values()) / len(tasks))
            assert method.tg == method.tg_tasks[run.target]
        multi = [m for m in comparison.results if m.kind == "multi-task"]
        for task, flag in comparison.snt.items():
            assert flag == (max(m.tg_tasks[task] for m in multi) < 0)


def test_rows_average_seeds_and_targets(report: Any, tmp_path: Path) -> None:
    result, _, _ = report
    rows = {(row["target"], row["method"]): row for row in result.rows()}
    ew = rows["t0", "ew"]
    runs = [r.comparison.result("ew") for r in result.runs if r.target == "t0"]
    assert ew["seeds"] == 2
    assert ew["tg_mean"] == pytest.approx(sum(r.tg for r in runs) / 2)
    assert ew["delta_m_mean"] == pytest.approx(sum(r.delta_m for r in runs) / 2)
    assert ew["wnt"] == (ew["tg_mean"] < 0)
    stl = rows["t0", "stl"]
    references = [r.comparison.reference_metrics["t2"]["mse"] for r in result.runs[:2]]
    assert stl["test/t2"] == pytest.approx(sum(references) / 2)  # STL's row: per-task STL
    across = {item["method"]: item for item in result.across_targets()}
    fm = across["forkmerge"]
    assert fm["targets"] == ["t0", "t1"]
    assert fm["delta_m_targets"] == pytest.approx(sum(fm["relative_per_target"].values()) / 2)
    assert across["stl"]["delta_m_targets"] == 0.0
    paths = result.save(tmp_path)
    payload = json.loads(paths["json"].read_text())  # strict JSON: no NaN
    assert set(payload) == {"config", "methods", "table", "snt", "across_targets", "runs"}
    assert set(payload["snt"]) == {"t0", "t1"}
    header = paths["csv"].read_text().splitlines()[0].split(",")
    assert {"target", "method", "tg_mean", "delta_m_mean", "wnt", "test/t3", "tg/t3"} <= set(header)


def test_the_reference_of_a_task_is_stl_trained_for_it() -> None:
    problem = ToyProblem()
    comparison = run_methods(problem, CONFIG, ("stl", "ew"), references="tasks")
    assert comparison.reference_metrics["t0"] == comparison.result("stl").test["t0"]
    assert comparison.reference_metrics["t2"] == stl_reference(problem, "t2", CONFIG)
    assert comparison.reference_seconds > 0
    only_target = run_methods(problem, CONFIG, ("ew",))
    assert only_target.result("ew").tg is None and only_target.result("ew").delta_m is None
    assert relative_improvement(2.0, 3.0, higher_is_better=True) == 0.5
    assert relative_improvement(2.0, 3.0, higher_is_better=False) == -0.5
    assert math.isnan(relative_improvement(0.0, 1.0, higher_is_better=True))


def test_parse_methods() -> None:
    assert parse_methods("stl, ew,stl") == ("stl", "ew")
    everything = parse_methods("all")
    assert everything[0] == "stl" and everything[-1] == "forkmerge"
    assert len(everything) == len(BASELINES) + 1  # every registered baseline, then ForkMerge
    with pytest.raises(ValueError, match="Parameter `methods` should be one of"):
        parse_methods("stl,nope")


# --- the command line ---------------------------------------------------------------------------

SPEC = """
[study]
name = "tiny-digits"
seed = 0
[problem]
benchmark = "digits"
target = "uci"
batch_size = 8
[training]
steps = 4
dt = 2
branches = 2
[search]
strategy = "greedy"
"""


@pytest.fixture
def main(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """``fm_optuna.cli.main`` with compare-methods registered (if cli.py does not do it yet)."""
    build = cli.build_parser

    def build_with_methods() -> argparse.ArgumentParser:
        parser = build()
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        if "compare-methods" not in sub.choices:
            from fm_optuna.cli._methods import add_commands

            add_commands(sub)
        return parser

    monkeypatch.setattr(cli, "build_parser", build_with_methods)
    yield cli.main


def test_cli_prints_json_and_saves_the_tables(
    main: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = tmp_path / "tiny.toml"
    spec.write_text(SPEC)
    out = tmp_path / "out"
    code = main(
        [
            "compare-methods",
            str(spec),
            "--methods",
            "stl,ew,pcgrad,ptft,forkmerge",
            "--json",
            "--out",
            str(out),
            "--tracking-uri",
            f"sqlite:///{tmp_path / 'mlflow.db'}",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    payload = json.loads(captured.out)
    assert set(payload) == {"table", "snt", "across_targets", "files"}
    assert [row["method"] for row in payload["table"]] == [
        "stl",
        "ew",
        "pcgrad",
        "ptft",
        "forkmerge",
    ]
    for row in payload["table"]:
        assert row["target"] == "uci" and row["metric"] == "accuracy"
        assert 0 <= row["target_test_mean"] <= 100
        assert {"test/uci", "test/mnist", "test/synfont", "test/mnistm"} <= set(row)
    assert payload["table"][0]["tg_mean"] == 0.0
    assert set(payload["snt"]["uci"]) == {"uci", "mnist", "synfont", "mnistm"}
    assert Path(payload["files"]["csv"]).is_file() and Path(payload["files"]["json"]).is_file()

    # Every method's run is in MLflow, tagged with the target it was compared on.
    from fm_optuna.tracking import open_store

    store = open_store(
        f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="fm-optuna/compare-methods/tiny-digits"
    )
    found = store.client.search_runs([store.experiment_id], max_results=100)
    runs = [r for r in found if r.data.tags["fm_optuna.role"] in ("forkmerge", "baseline")]
    assert sorted(r.data.tags["method"] for r in runs) == sorted(
        ["stl", "ew", "pcgrad", "ptft", "forkmerge"]
    )
    assert {r.data.tags["target"] for r in runs} == {"uci"}
    # ... all FINISHED with their final metrics, under the invocation's one parent run.
    (parent,) = [r for r in found if r.data.tags["fm_optuna.role"] == "compare-methods"]
    assert parent.info.status == "FINISHED"
    for run in runs:
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert {"final/target_val", "final/target_test", "final/val/uci/accuracy"} <= set(
            run.data.metrics
        )


def test_cli_unknown_method_exits_2_before_training(
    main: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = tmp_path / "tiny.toml"
    spec.write_text(SPEC)
    code = main(["compare-methods", str(spec), "--methods", "stl,nope"])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    assert "Parameter `methods` should be one of" in captured.err
    assert "Found `methods = nope`" in captured.err
    assert len(captured.err.strip().splitlines()) == 1


def test_task_affinity_cli_saves_and_logs_the_heat_map(
    main: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = tmp_path / "tiny.toml"
    spec.write_text(SPEC)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = main(
        [
            "task-affinity",
            str(spec),
            "--seeds",
            "1",
            "--affinity-steps",
            "3",
            "--json",
            "--out",
            str(tmp_path / "out"),
            "--tracking-uri",
            uri,
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    payload = json.loads(captured.out)
    n = len(payload["tasks"])
    assert len(payload["mean_matrix"]) == n and all(len(row) == n for row in payload["mean_matrix"])
    assert Path(payload["files"]["heatmap"]).stat().st_size > 0

    from fm_optuna.tracking import open_store

    store = open_store(uri, experiment="fm-optuna/task-affinity/tiny-digits")
    (run,) = store.client.search_runs([store.experiment_id])
    names = {a.path for a in store.client.list_artifacts(run.info.run_id)}
    assert {"affinity.png", "affinity.json"} <= names
    assert "kendall_tau_mean" in run.data.metrics
