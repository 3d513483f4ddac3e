"""The study run as a page: its description lists every trial with a link to its run, the best
complete trial with its Λ, and the baselines, which are MLflow runs under the study's run."""

from __future__ import annotations

import re
from pathlib import Path

import optuna
import pytest

from tests.integration.test_tune import spec_file, tuner

pytestmark = pytest.mark.slow


def test_study_description_has_the_trial_table_with_links_and_the_baseline_runs(
    tmp_path: Path,
) -> None:
    from fm_optuna.tracking import StudyTracking, open_store

    path = spec_file(tmp_path, n_trials=3)
    path.write_text(path.read_text().replace('name = "toy"', 'name = "toy"\nbaselines = ["stl"]'))
    store = open_store(f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="fm-optuna/study/toy")
    tracking = StudyTracking(store, "toy", higher_is_better=False)
    report = tuner(path, tracking=lambda problem: tracking).run()
    study = optuna.load_study(study_name="toy", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    run = store.client.get_run(study.user_attrs["mlflow_study_run_id"])
    note = run.data.tags["mlflow.note.content"]

    best = study.best_trial
    assert note.startswith(f"### Study `toy` · best trial {best.number}: value")
    assert run.data.tags["fm_optuna.best_run_id"] == best.user_attrs["mlflow_run_id"]
    eid = store.experiment_id
    for trial in study.trials:  # one row per trial, linked to its run, with its Δt and L
        run_id = trial.user_attrs["mlflow_run_id"]
        row = next(line for line in note.splitlines() if line.startswith(f"| [{trial.number}]("))
        assert f"(#/experiments/{eid}/runs/{run_id})" in row
        assert trial.state.name in row
        assert f"| {trial.params['dt']} |" in row and f"| {trial.params['branches']} |" in row
    assert re.search(r"\| `branches` \| `dt` \| value \| reason \|", note)
    assert "Λ `target`" in note  # the best trial's Λ
    assert (
        f"get-artifact?path=lambda_trajectory.png&run_uuid={best.user_attrs['mlflow_run_id']}"
        in note
    )

    baselines = store.client.search_runs(
        [eid],
        f"tags.`mlflow.parentRunId` = '{run.info.run_id}' and tags.`fm_optuna.role` = 'baseline'",
    )
    assert [b.data.tags["method"] for b in baselines] == ["stl"]
    (stl,) = baselines
    assert stl.info.status == "FINISHED"
    assert stl.data.metrics["final/target_test"] == pytest.approx(report.baselines["stl"]["test"])
    assert f"[stl](#/experiments/{eid}/runs/{stl.info.run_id})" in note
    assert any("best complete trial" in line for line in report.tracking["browse"])
