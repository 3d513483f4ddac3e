"""``compare --replay``: every strategy on the same saved merge problems."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fm_optuna.cli import main
from fm_optuna.core._events import EventStream
from fm_optuna.core._loop import ForkMergeConfig, run_forkmerge
from fm_optuna.errors import ConfigError
from fm_optuna.search._merge_problem import MergeProblemWriter
from fm_optuna.search._replay import Tolerance, find_merge_problems, load_merge_problems, replay
from tests.conftest import ToyProblem


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("merges")
    config = ForkMergeConfig(total_steps=4, dt=2, branches=3, ranking="given", strategy="greedy")
    run_forkmerge(ToyProblem(), config, EventStream([MergeProblemWriter(folder, {"toy": 1})]))
    return folder


def test_replay_runs_every_strategy_on_the_same_problems(saved: Path, tmp_path: Path) -> None:
    built: list[object] = []

    def build(source: object) -> ToyProblem:
        built.append(source)
        return ToyProblem()

    merges = load_merge_problems(find_merge_problems(saved), build)
    assert len(merges) == 2 and built == [{"toy": 1}]  # one rebuild per recipe
    comparison = replay(merges, ["grid", "tpe", "gradient"], [3, 6], pruned=True)
    labels = {r.strategy for r in comparison.runs}
    assert labels == {"grid", "tpe", "gradient", "grid+pruned", "tpe+pruned", "gradient+pruned"}
    for run in comparison.runs:
        assert run.regret >= 0 and run.regret == comparison.best[run.problem] - run.val
        assert run.curve[-1][1] <= comparison.best[run.problem]
        assert run.passes <= run.evaluations
    grid = [r for r in comparison.runs if r.strategy == "grid"]
    assert all(r.evaluations == 66 and r.budget == 6 for r in grid)  # the lattice, run once
    rows = comparison.rows()
    assert {(row["strategy"], row["budget"]) for row in rows if row["strategy"] == "tpe"} == {
        ("tpe", 3),
        ("tpe", 6),
    }
    paths = comparison.save(tmp_path)
    saved_json = json.loads(paths["json"].read_text())
    table = saved_json["table"]
    assert len(table) == len(rows) and paths["plot"].stat().st_size > 0
    for run, record in zip(comparison.runs, saved_json["runs"], strict=True):  # the chosen Λ
        assert record["weights"] == list(run.weights) and abs(sum(run.weights) - 1) < 1e-9
        assert len(run.weights) == run.n_branches
    assert paths["csv"].read_text().startswith("L,strategy,budget")


def test_replay_mistakes_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compare", "--replay", str(tmp_path / "missing"), "--no-tracking"]) == 2
    assert main(["compare", "--no-tracking"]) == 2
    assert main(["compare", "--replay", str(tmp_path), "--budgets", "0,5"]) == 2
    assert main(["compare", "--replay", str(tmp_path), "--tolerance", "1pp"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 4
    assert "`replay`" in lines[0] and "`spec`" in lines[1] and "`budgets`" in lines[2]
    assert "`tolerance`" in lines[3] and "1%" in lines[3]


def test_tolerance_is_absolute_or_relative_to_the_best() -> None:
    assert Tolerance.parse("0.1") == Tolerance(0.1) and Tolerance.parse("0.1").of(-5.0) == 0.1
    assert Tolerance.parse("1%") == Tolerance(1.0, relative=True)
    assert Tolerance.parse(" 1% ").of(-0.62) == pytest.approx(0.0062)
    assert str(Tolerance.parse("0.5%")) == "0.5%" and str(Tolerance(0.1)) == "0.1"
    for text in ("x", "-1", "-1%", "nan", "%"):
        with pytest.raises(ConfigError, match="`tolerance`"):
            Tolerance.parse(text)


def test_a_minimised_metric_has_regret_above_the_lowest_error(saved: Path) -> None:
    """The toy's metric is an MSE (lower is better): regret is the MSE above the lowest found,
    and a relative tolerance is a share of that lowest MSE."""
    merges = load_merge_problems(find_merge_problems(saved), lambda source: ToyProblem())
    comparison = replay(merges, ["grid", "random"], [5], tolerance=Tolerance(1.0, relative=True))
    for name, _ in merges:
        runs = [r for r in comparison.runs if r.problem == name]
        errors = [-r.val for r in runs]  # the toy's score is −MSE
        lowest = min(min(-s for _, s in r.curve) for r in runs)
        assert comparison.best[name] == -lowest and min(errors) >= lowest
        assert comparison.tolerance[name] == pytest.approx(0.01 * lowest)
        for run in runs:
            assert run.regret == pytest.approx(-run.val - lowest)
            assert comparison.relative_regret(run) == pytest.approx(100 * run.regret / lowest)
    for row in comparison.rows():
        runs = [r for r in comparison.runs if r.strategy == row["strategy"]]
        expected = sum(-r.val <= 1.01 * -comparison.best[r.problem] + 1e-9 for r in runs)
        assert row["within_tolerance"] == pytest.approx(expected / len(runs))
    assert comparison.config["tolerance"] == "1%"
