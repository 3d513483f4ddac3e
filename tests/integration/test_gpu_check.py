"""The GPU check's dry run on the CPU: every check runs, passes, and MLflow is never imported."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_the_gpu_check_runs_on_the_cpu_with_only_its_bundle(tmp_path: Path) -> None:
    out = tmp_path / "out"
    # What a GPU machine with only the gpu-bundle wheels lacks is made unimportable.
    blocked = ("mlflow", "cvxpy", "pandas", "pyarrow", "optuna_dashboard")
    script = str(ROOT / "studies" / "gpu_check.py")
    argv = [script, "--device", "cpu", "--size", "tiny", "--no-tracking", "--out", str(out)]
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import runpy, sys\n"
            f"sys.modules.update(dict.fromkeys({blocked!r}))\n"
            f"sys.argv = {argv!r}\n"
            f"runpy.run_path({script!r}, run_name='__main__')",
        ],
        cwd=tmp_path,  # a fresh folder: the script finds the package from its own path
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    checks = {check["name"]: check for check in json.loads((out / "gpu_check.json").read_text())}
    assert all(check["passed"] for check in checks.values()), checks
    assert set(checks) == {
        "forkmerge (amp, parallel branches) vs the CPU",
        "tune: 3 trials",
        "bench (tracking off)",
        "mlflow never imported",
    }
    assert checks["tune: 3 trials"]["figures"]["states"] == ["COMPLETE"] * 3
    assert "parallel / sequential branches" in checks["bench (tracking off)"]["figures"]
    assert "4/4 checks passed" in done.stdout


def test_the_gpu_check_refuses_cuda_without_a_device(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    done = subprocess.run(
        [sys.executable, str(ROOT / "studies" / "gpu_check.py"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "gpu_check: Parameter `device` should be cpu (no CUDA device is available). "
        "Found `device = cuda`."
    ]
