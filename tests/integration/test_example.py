"""The worked example (examples/diabetes.py) as a new user runs it, and the README shows it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "diabetes.py"


def test_the_readme_section_shows_the_tested_example() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Your own problem", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 2
    source = EXAMPLE.read_text()
    for block in blocks:
        assert block.strip() in source  # verbatim: the README's code is the tested code
    assert "examples.diabetes:build" in section and "fm-optuna ui" in section


def _run(args: list[str], cwd: Path, uri: str) -> str:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "MLFLOW_TRACKING_URI": uri,
        "PYTHONWARNINGS": "error::DeprecationWarning",
    }
    result = subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow
def test_the_example_commands_run_end_to_end_and_land_in_mlflow(tmp_path: Path) -> None:
    """From a fresh folder: run, tune and `python -m examples.diabetes`; the stores read back."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    spec = (ROOT / "examples" / "diabetes.toml").read_text()
    small = spec.replace("steps = 300", "steps = 40").replace("dt = 50", "dt = 20")
    small = small.replace("low = 25, high = 100", "low = 10, high = 40").replace(
        "n_trials = 8", "n_trials = 2"
    )
    (tmp_path / "diabetes.toml").write_text(small)

    cli = ["-m", "fm_optuna.cli"]
    out = _run(
        [*cli, "run", "--benchmark", "examples.diabetes:build", "--steps", "40", "--dt", "20"],
        tmp_path,
        uri,
    )
    assert "benchmark diabetes  target progression  metric mae" in out
    out = _run([*cli, "tune", "diabetes.toml"], tmp_path, uri)
    assert "study diabetes" in out and "COMPLETE 2" in out

    from fm_optuna.tracking import open_store

    client = open_store(uri, experiment="Default").client  # open_store: SQLAlchemy's warning muted
    experiments = {e.name: e.experiment_id for e in client.search_experiments()}
    assert {"fm-optuna/diabetes-progression", "fm-optuna/study/diabetes"} <= set(experiments)
    runs = client.search_runs(list(experiments.values()))
    finished = [r for r in runs if r.data.tags.get("fm_optuna.role") != "study"]
    assert {r.info.status for r in finished} == {"FINISHED"}
    forkmerge = [r for r in runs if r.data.tags.get("fm_optuna.role") == "forkmerge"]
    assert len(forkmerge) == 3  # the run command's and one per outer trial
    for run in forkmerge:
        assert any(key.startswith("lambda/") for key in run.data.metrics)

    out = _run(["-m", "examples.diabetes"], tmp_path, uri)  # the API, tracked to its own store
    assert out.count("Λ = [") == 6
    local = open_store(f"sqlite:///{tmp_path}/tracking/mlflow.db", experiment="Default").client
    runs = local.search_runs([e.experiment_id for e in local.search_experiments()])
    assert runs and {r.info.status for r in runs} == {"FINISHED"}
    parent = next(r for r in runs if r.data.tags["fm_optuna.role"] == "forkmerge")
    assert len(local.get_metric_history(parent.info.run_id, "lambda/target")) == 6
