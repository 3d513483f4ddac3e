"""The ForkMerge run's markdown note (the Λ table) and the progress lines written for logs."""

from __future__ import annotations

import io
import re

from fm_optuna.config import ForkMergeConfig
from fm_optuna.core._events import EventStream
from fm_optuna.core._loop import run_forkmerge
from fm_optuna.core._progress import ProgressLines
from fm_optuna.tracking.notes import MergeRow, lambda_note
from tests.conftest import ToyProblem

BRANCHES = ["target", "target+top2", "all"]
TASKS = ["mnistm", "mnistm, uci, mnist", "mnistm, uci, mnist, synfont, harmful"]


def rows(n: int) -> list[MergeRow]:
    return [
        MergeRow(i + 1, 50 * (i + 1), (0.6, 0.4, 0.0), 80.0 + i, "target", 79.5 + i)
        for i in range(n)
    ]


def test_note_is_the_lambda_table_with_the_gain_and_the_figure() -> None:
    note = lambda_note(
        "trial3-forkmerge-seed0",
        BRANCHES,
        TASKS,
        rows(2),
        rounds=6,
        figures=["lambda_trajectory.png"],
        images=[("Λ", "get-artifact?path=lambda_trajectory.png&run_uuid=abc")],
    )
    lines = note.splitlines()
    assert lines[0] == "### Λ per merge · trial3-forkmerge-seed0"
    # The compact figure first, then the table: both above MLflow's "Show more" fold.
    assert lines[2] == "![Λ](get-artifact?path=lambda_trajectory.png&run_uuid=abc)"
    assert lines[4] == (
        "| round | step | Λ `target` | Λ `target+top2` | Λ `all` | merged val | "
        "best branch alone | gain |"
    )
    assert "| 2 | 100 | **0.60** | 0.40 | 0.00 | 81.00 | target 80.50 | +0.50 |" in lines
    assert "**2 of 6 merges**" in note and "the merge beat every single branch at 2 of 2" in note
    assert "![Λ](get-artifact?path=lambda_trajectory.png&run_uuid=abc)" in lines
    assert "- `all`: mnistm, uci, mnist, synfont, harmful" in lines


def test_note_before_the_first_merge_and_beyond_the_tag_limit() -> None:
    empty = lambda_note("fm", BRANCHES, TASKS, [], rounds=6)
    assert "No merge yet (0 of 6 merges)." in empty
    long = lambda_note("fm", BRANCHES, TASKS, rows(400), rounds=400, limit=8000)
    assert len(long) <= 8000
    assert re.search(r"\| … \| \d+ earlier merges in `lambda_trajectory.csv` \|", long)
    assert "| 400 | 20000 |" in long  # the latest merges are the ones kept


def test_progress_lines_one_per_merge_round_and_one_per_finished_run() -> None:
    out = io.StringIO()
    config = ForkMergeConfig(dt=10, total_steps=30, branches=3, ranking_steps=5, seed=0)
    run_forkmerge(ToyProblem(), config, EventStream([ProgressLines(out, prefix="trial 2")]))
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("trial 2 [forkmerge] started: 30 steps with branches target, ")
    merges = [line for line in lines if "round" in line]
    assert [m.split("round ")[1].split(" ")[0] for m in merges] == ["1/3", "2/3", "3/3"]
    # The toy target's metric is an MSE: shown as itself (positive), not as the oriented −MSE.
    pattern = (
        r"Λ target=\d\.\d\d .* val mse \d[\d.e+-]* \(merge better than the best branch by [+-]\d"
    )
    assert all(re.search(pattern, m) for m in merges), merges
