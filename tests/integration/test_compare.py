"""``fm-optuna compare``: the same training once per strategy; table, files and MLflow runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fm_optuna.cli import main
from fm_optuna.core import _ranking as ranking
from fm_optuna.core._events import Observer, RunStarted
from fm_optuna.core._loop import ForkMergeConfig
from fm_optuna.core._ranking import Ranking
from fm_optuna.experiments._compare_strategies import compare_strategies
from tests.conftest import ToyProblem

SPEC = """
[study]
name = "tiny"
seed = 0
[problem]
benchmark = "digits"
target = "uci"
[training]
steps = 40
dt = 20
branches = 3
ranking = "given"
"""


def test_strategies_share_everything_but_the_search() -> None:
    config = ForkMergeConfig(dt=10, total_steps=30, branches=3, merge_trials=5, ranking_steps=5)
    comparison = compare_strategies(ToyProblem(), config, ["grid", "greedy", "random"], [0, 1])
    rows = {row["strategy"]: row for row in comparison.rows()}
    assert set(rows) == {"grid", "greedy", "random"} and rows["grid"]["seeds"] == 2
    assert rows["grid"]["l1_from_grid"] == 0.0 and rows["random"]["l1_from_grid"] >= 0.0
    assert rows["greedy"]["evaluations_per_merge"] == 6 * 2  # Alg. 3: 6 alphas × (L − 1)
    assert rows["grid"]["evaluations_per_merge"] == 66
    assert rows["random"]["evaluations_per_merge"] == 5
    for run in comparison.runs:
        assert len(run.lambdas) == 3


class BranchNames(Observer):
    def __init__(self) -> None:
        self.names: list[str] = []

    def on_run_started(self, event: RunStarted) -> None:
        self.names = list(event.branches)


@pytest.mark.parametrize("cut", ["auto", "gaps"])
def test_strategies_cut_where_the_shared_pre_pass_relevance_drops(
    cut: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A pre-pass whose scores drop once, clearly, after the first auxiliary: both relevance
    # rules cut there (top-1), while the even spread over 5 auxiliaries would keep top-3.
    crafted = Ranking(("t1", "t2", "t3", "t4", "t5"), (1.0, 0.10, 0.09, 0.08, 0.07), 0.5, "prepass")
    measured = ranking.rank_auxiliaries

    def prepass(
        problem: ToyProblem, config: ForkMergeConfig, initial: object, **options: object
    ) -> Ranking:
        if config.ranking == "prepass":
            return crafted
        return measured(problem, config, initial, **options)  # type: ignore[arg-type]

    monkeypatch.setattr(ranking, "rank_auxiliaries", prepass)
    seen: dict[str, BranchNames] = {}

    def observers(strategy: str, seed: int) -> list[BranchNames]:
        seen[strategy] = BranchNames()
        return [seen[strategy]]

    config = ForkMergeConfig(dt=5, total_steps=10, branches=3, merge_trials=3, cut=cut)
    comparison = compare_strategies(
        ToyProblem(n_tasks=6), config, ["greedy", "random"], [0], observers=observers
    )
    for strategy in ("greedy", "random"):
        assert seen[strategy].names == ["target", "target+top1", "all"], strategy
    assert [run.branches for run in comparison.runs] == [["target", "target+top1", "all"]] * 2
    assert comparison.config["ranking"] == "prepass"


def test_a_joint_plan_is_ranked_over_every_task_of_the_pseudo_target() -> None:
    # App. A.4: every task is an auxiliary of the pseudo-target, so the shared ranking must be
    # measured on the wrapped problem, as a single run would (it was measured on the target's).
    config = ForkMergeConfig(dt=5, total_steps=10, plan="joint", branches=3, merge_trials=3)
    comparison = compare_strategies(ToyProblem(), config, ["random"], [0])
    assert len(comparison.runs) == 1 and len(comparison.runs[0].branches) == 3


def test_cli_prints_the_table_saves_files_and_tags_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = tmp_path / "tiny.toml"
    spec.write_text(SPEC)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = main(
        [
            "compare",
            str(spec),
            "--strategies",
            "grid,tpe",
            "--seeds",
            "1",
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
    assert [row["strategy"] for row in payload["table"]] == ["grid", "tpe"]
    for kind in ("csv", "json", "plot"):
        assert Path(payload["files"][kind]).stat().st_size > 0

    from fm_optuna.tracking import open_store

    store = open_store(uri, experiment="fm-optuna/compare/tiny")
    runs = store.client.search_runs([store.experiment_id], "tags.`fm_optuna.role` = 'forkmerge'")
    assert sorted(r.data.tags["strategy"] for r in runs) == ["grid", "tpe"]
    # Every compared run ended FINISHED with the same final keys as `run`, under one parent run
    # of this invocation, which holds the comparison's files.
    parents = store.client.search_runs([store.experiment_id], "tags.`fm_optuna.role` = 'compare'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0].info.run_id
    for run in runs:
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parent
        assert run.data.tags["fm_optuna.status"] == "COMPLETE"
        for key in ("final/target_val", "final/target_test", "final/val/uci/accuracy"):
            assert key in run.data.metrics, (key, sorted(run.data.metrics))
    files = {Path(f.path).name for f in store.client.list_artifacts(parent)}
    assert {"strategies.csv", "strategies.json", "strategies.png"} <= files
    branches = store.client.search_runs([store.experiment_id], "tags.`fm_optuna.role` = 'branch'")
    assert branches and all(b.info.status == "FINISHED" for b in branches)
    assert "browse: MLflow experiment 'fm-optuna/compare/tiny'" in captured.err
