"""Workers started together on new SQLite stores: both open them, and the files stay usable."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

OPEN_BOTH = """
import sys, time
sys.path.insert(0, {root!r})
from fm_optuna.study._tuner import open_storage
from fm_optuna.tracking.store import open_store

while time.time() < {start}:  # start together, as workers launched by one script do
    time.sleep(0.005)
open_store({mlflow!r}, experiment="shared")
open_storage({optuna!r}, heartbeat_seconds=10, max_retry=1)
print("opened")
"""


def test_two_workers_create_the_same_new_sqlite_stores_together(tmp_path: Path) -> None:
    mlflow = f"sqlite:///{tmp_path / 'tracking' / 'mlflow.db'}"
    optuna = f"sqlite:///{tmp_path / 'optuna.db'}"

    def start_two() -> list[subprocess.CompletedProcess[str]]:
        code = OPEN_BOTH.format(
            root=str(ROOT), start=time.time() + 5.0, mlflow=mlflow, optuna=optuna
        )
        workers = [
            subprocess.Popen(
                [sys.executable, "-c", code],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(2)
        ]
        return [
            subprocess.CompletedProcess(w.args, w.wait(timeout=180), *w.communicate())
            for w in workers
        ]

    for worker in start_two():  # created together …
        assert worker.returncode == 0 and worker.stdout.strip() == "opened", worker.stderr[-2000:]
    for worker in start_two():  # … and whole afterwards (a half-migrated file fails every open)
        assert worker.returncode == 0, worker.stderr[-2000:]
