"""optuna-dashboard shows Λ: each trial's note and Λ figure, read back through its Python API."""

from __future__ import annotations

from pathlib import Path

import optuna
from optuna.artifacts import FileSystemArtifactStore, download_artifact, get_all_artifact_meta
from optuna.pruners import BasePruner
from optuna.trial import FrozenTrial, TrialState
from optuna_dashboard import get_note

from fm_optuna.study._dashboard import LAMBDA_ATTR, note_markdown
from fm_optuna.study._shared_baselines import CLAIM
from tests.integration.test_tune import spec_file, tuner


class PruneTrialOne(BasePruner):
    """Prunes trial 1 at its first report, so the study has a pruned trial every time."""

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        return trial.number == 1


def test_every_trial_shows_its_lambda_note_and_figure_in_the_dashboard(tmp_path: Path) -> None:
    from fm_optuna.tracking import StudyTracking, open_store

    store = open_store(f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="fm-optuna/study/toy")
    path = spec_file(tmp_path, n_trials=3)
    path.write_text(path.read_text().replace('name = "toy"', 'name = "toy"\nbaselines = ["ew"]'))
    tune = tuner(
        path,
        pruner=PruneTrialOne(),
        tracking=lambda problem: StudyTracking(store, "toy", higher_is_better=False),
    )
    report = tune.run()
    study = optuna.load_study(study_name="toy", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    states = [t.state for t in study.trials]
    assert states.count(TrialState.COMPLETE) == 2 and states.count(TrialState.PRUNED) == 1
    artifacts = tune.artifact_dir
    assert artifacts.is_absolute() and artifacts == (tmp_path / "checkpoints/toy/artifacts")

    for frozen in study.trials:
        trial = optuna.Trial(study, frozen._trial_id)  # what the dashboard's API reads
        history = frozen.user_attrs[LAMBDA_ATTR]
        assert history and len(history) == len(frozen.intermediate_values)  # pruned: Λ so far
        note = get_note(trial)
        assert f"Trial {frozen.number} · " in note and "| round | step |" in note
        assert note.count("\n| ") == len(history) + 1  # header and one row per merge
        assert frozen.user_attrs["mlflow_run_id"] in note and "fm-optuna ui" in note
        if frozen.state != TrialState.COMPLETE:
            continue
        assert Path(frozen.user_attrs["final_model"]).is_absolute()
        (meta,) = get_all_artifact_meta(frozen, storage=study._storage)
        assert meta.filename == "lambda.png" and meta.mimetype == "image/png"
        out = tmp_path / f"trial_{frozen.number}.png"
        download_artifact(
            artifact_store=FileSystemArtifactStore(str(artifacts)),
            artifact_id=meta.artifact_id,
            file_path=str(out),
        )
        assert out.read_bytes().startswith(b"\x89PNG")
    assert report.baselines  # the baselines' coordination records are not listed as the study's
    assert not [key for key in study.user_attrs if key.startswith(CLAIM)]


def test_the_note_is_a_table_of_lambda_per_merge() -> None:
    merges = [(1, 20, (0.5, 0.5), 0.25), (2, 40, (1.0, 0.0), 0.125)]
    note = note_markdown("T", ("target", "all"), merges, metric="target_val/mse", run="`r1`")
    assert note.splitlines() == [
        "## T",
        "",
        "MLflow run: `r1`",
        "",
        "| round | step | Λ target | Λ all | target_val/mse |",
        "|---:|---:|---:|---:|---:|",
        "| 1 | 20 | 0.500 | 0.500 | 0.25 |",
        "| 2 | 40 | 1.000 | 0.000 | 0.125 |",
    ]
