"""The GPU check's dry run on the CPU: every check runs, passes, and MLflow is never imported;
the multi-GPU check is skipped, saying why, and runs on CPU copies when called directly."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    assert f"skip one device per branch: needs two CUDA devices, this machine has {count}" in (
        done.stdout
    )


def test_the_one_device_per_branch_check_passes_on_cpu_copies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Check 4 itself, run on two CPU entries (which only this test can give it): the same
    code as on a node's GPUs, and on the CPU the run must be bit-identical to one device."""
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "studies" / "gpu_check.py")
    assert spec is not None and spec.loader is not None
    gpu_check = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", gpu_check)  # its dataclasses look it up
    spec.loader.exec_module(gpu_check)
    cpu = torch.device("cpu")
    check = gpu_check.check_devices([cpu, cpu], gpu_check.SIZES["tiny"], 5.0, tmp_path)
    assert check.passed, check.figures
    assert check.figures["devices_trained_on"] == ["cpu"]
    assert check.figures["bit_identical"] and check.figures["resumed_on_first_lambda_equal"]


def test_the_gpu_check_refuses_cuda_without_a_device(tmp_path: Path) -> None:
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
