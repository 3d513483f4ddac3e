"""Full disks and read-only places (issue 18, items 3 and 4), on real filesystems: a tiny tmpfs
for ENOSPC and a read-only bind mount for EROFS. Skipped with the reason where the machine does
not allow mounting (not root, no mount namespace)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

from fm_optuna.core._checkpoints import load_checkpoint

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["--merge-trials", "3", "--no-tracking"]


def fm(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fm_optuna.cli", *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        capture_output=True,
        text=True,
        timeout=600,
    )


def _mount(*args: str) -> str | None:
    """Run ``mount``; the reason it failed, or ``None``."""
    try:
        done = subprocess.run(["mount", *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as error:
        return str(error)
    return None if done.returncode == 0 else (done.stderr.strip() or f"exit {done.returncode}")


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 100 KiB tmpfs: one checkpoint of the diabetes example (~64 KiB) fits, two do not."""
    folder = tmp_path / f"tiny-{uuid.uuid4().hex[:6]}"
    folder.mkdir()
    why = _mount("-t", "tmpfs", "-o", "size=100k", "tmpfs", str(folder))
    if why is not None:
        pytest.skip(f"cannot mount a tmpfs here ({why})")
    try:
        yield folder
    finally:
        _umount(folder)


@pytest.fixture
def read_only(tmp_path: Path) -> Iterator[Path]:
    """A folder that is a read-only bind mount of an empty one (EROFS, even for root)."""
    source, folder = tmp_path / "ro-source", tmp_path / "ro"
    source.mkdir()
    folder.mkdir()
    why = _mount("--bind", str(source), str(folder))
    if why is None:
        why = _mount("-o", "remount,bind,ro", str(folder))
        if why is not None:
            _umount(folder)
    if why is not None:
        pytest.skip(f"cannot make a read-only bind mount here ({why})")
    try:
        yield folder
    finally:
        _umount(folder)


def one_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


RUN = ["run", "--benchmark", "examples.diabetes:build", "--methods", "forkmerge", "--dt", "50"]


def test_a_full_disk_under_the_checkpoint_is_one_line_exit_1_and_keeps_the_last_one(
    tmp_path: Path, tiny_disk: Path
) -> None:
    checkpoint = tiny_disk / "fm.ckpt"
    done = fm(*RUN, "--steps", "400", *SMALL, "--checkpoint", str(checkpoint), cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    line = one_line(done.stderr)
    assert f"cannot write {checkpoint}: No space left on device" in line
    assert "the previous checkpoint is intact" in line
    snapshot = load_checkpoint(checkpoint)  # a whole checkpoint, resumable
    assert snapshot is not None and snapshot["round"] >= 1
    assert not [p for p in tiny_disk.iterdir() if p.suffix == ".tmp"]


def test_a_read_only_checkpoint_folder_is_refused_before_training(
    tmp_path: Path, read_only: Path
) -> None:
    done = fm(
        *RUN, "--steps", "4000", *SMALL, "--checkpoint", str(read_only / "a.ckpt"), cwd=tmp_path
    )
    assert done.returncode == 2
    line = one_line(done.stderr)
    assert "Parameter `checkpoint` should be a folder this process can write in" in line
    assert "Read-only file system" in line
    assert done.stdout == ""  # nothing trained, no table


SPEC = """
[study]
name = "disk"
n_trials = 2
seed = 0
storage = "sqlite:///{root}/optuna.db"
checkpoint_dir = "{checkpoints}"
pruner = "none"
[problem]
benchmark = "examples.diabetes:build"
[training]
steps = 400
dt = 50
ranking = "given"
[search]
strategy = "random"
merge_trials = 3
[space]
dt = {{ low = 40, high = 60 }}
"""


def test_a_read_only_study_checkpoint_dir_is_refused_before_any_store(
    tmp_path: Path, read_only: Path
) -> None:
    spec = tmp_path / "disk.toml"
    spec.write_text(SPEC.format(root=tmp_path, checkpoints=read_only))
    done = fm("tune", str(spec), "--no-tracking", cwd=tmp_path)
    assert done.returncode == 2
    line = one_line(done.stderr)
    assert "Parameter `study.checkpoint_dir` should be a folder this process can write in" in line
    assert not (tmp_path / "optuna.db").exists()


def test_a_full_disk_during_tune_stops_it_non_zero_and_leaves_the_trial_retryable(
    tmp_path: Path, tiny_disk: Path
) -> None:
    spec = tmp_path / "disk.toml"
    spec.write_text(SPEC.format(root=tmp_path, checkpoints=tiny_disk))
    done = fm("tune", str(spec), "--no-tracking", cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("fm-optuna tune: error: cannot write ") and "No space left" in last
    study = optuna.load_study(study_name="disk", storage=f"sqlite:///{tmp_path}/optuna.db")
    failed, retry = study.get_trials(deepcopy=False)
    assert failed.state == TrialState.FAIL and failed.user_attrs["retryable"] is True
    assert "No space left on device" in failed.user_attrs["fail_reason"]
    assert retry.state == TrialState.WAITING and retry.params == failed.params


def test_a_read_only_cache_is_used_without_writing_and_says_so(
    read_only: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fm_optuna.benchmarks._images import load_or_build
    from fm_optuna.errors import ProblemWarning

    monkeypatch.setenv("FM_OPTUNA_CACHE", str(read_only))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = load_or_build("toy-ro-v1.pt", lambda: {"x": torch.ones(3)})
    assert torch.equal(data["x"], torch.ones(3))
    notes = [w for w in caught if issubclass(w.category, ProblemWarning)]
    assert len(notes) == 1 and "cannot be written (Read-only file system)" in str(notes[0].message)
