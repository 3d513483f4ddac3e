"""The shared-study throughput benchmark runs end to end on a tiny budget."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SPEC = """
[study]
name = "bench"
sampler = "random"
pruner = "none"
[problem]
benchmark = "digits"
target_train = 100
aux_train = 200
val_size = 100
test_size = 100
aux_eval = 50
[training]
steps = 20
dt = 10
branches = 2
ranking = "given"
[search]
merge_trials = 2
[space]
dt = { low = 5, high = 20 }
"""


@pytest.mark.slow
def test_two_workers_over_one_smoke_run(tmp_path: Path) -> None:
    (tmp_path / "spec.toml").write_text(SPEC)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fm_optuna.experiments._bench_workers",
            "spec.toml",
            "--storage",
            storage,
            "--trials",
            "2",
            "--json",
        ],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    (measured,) = report["rounds"]
    for count in ("1", "2"):
        item = measured[count]
        assert item["distinct_trials"] >= 2 and item["seconds"] > 0  # 2 workers may end at 3
        assert item["complete"] + item["pruned"] >= item["distinct_trials"]
    assert report["ratio"] == pytest.approx(measured["ratio"]) and report["goal"] == 1.7
