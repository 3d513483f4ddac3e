"""Files written before the package moved into subpackages (main at 97adee3) still load: a
checkpoint resumes through ``fm-optuna run --resume`` and a saved merge problem replays."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from examples.diabetes import build
from fm_optuna import cli
from fm_optuna.config import ForkMergeConfig
from fm_optuna.core import check_resumable, load_checkpoint
from fm_optuna.search import MergeProblem
from fm_optuna.search._merge_problem import load_data

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "pre_move"
#: The configuration of the run that wrote them (its CLI searched with greedy then).
WRITTEN_WITH = ForkMergeConfig(dt=20, total_steps=40, strategy="greedy")


def test_a_checkpoint_written_before_the_move_loads_and_matches_its_configuration() -> None:
    snapshot = load_checkpoint(FIXTURES / "diabetes-forkmerge.ckpt")
    assert snapshot is not None and snapshot["round"] == 2
    check_resumable(WRITTEN_WITH, snapshot)
    assert [d["weights"] for d in snapshot["decisions"]] == [[1.0, 0.0], [1.0, 0.0]]


@pytest.mark.slow
def test_run_resumes_from_a_checkpoint_written_before_the_move(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoint = tmp_path / "ck.ckpt"
    shutil.copy(FIXTURES / "diabetes-forkmerge.ckpt", checkpoint)
    monkeypatch.chdir(tmp_path)
    code = cli.main(
        [
            "run",
            "--benchmark",
            "examples.diabetes:build",
            "--steps",
            "40",
            "--dt",
            "20",
            "--strategy",
            "greedy",
            "--methods",
            "forkmerge",
            "--no-tracking",
            "--checkpoint",
            str(checkpoint),
            "--resume",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0 and "resumed after round 2" in out
    assert "Λ = [1.00, 0.00]  val mae 0.67" in out  # the final merge the old run recorded


def test_a_merge_problem_saved_before_the_move_replays_its_decision() -> None:
    data = load_data(FIXTURES / "diabetes-forkmerge-round002.pt")
    merge = MergeProblem.from_data(data, build(target="progression", seed=0))
    assert merge.n_branches == 2 and merge.round == 2
    assert merge.score([1.0, 0.0]) == pytest.approx(data["branch_scores"][0])
