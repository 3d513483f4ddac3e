"""The command line end to end: small real runs on each benchmark, and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fm_optuna.cli import _run

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["--dt", "20", "--steps", "40", "--merge-trials", "4", "--no-tracking"]


def fm(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONWARNINGS": "error::DeprecationWarning"}
    return subprocess.run(
        [sys.executable, "-m", "fm_optuna.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.parametrize(
    ("benchmark", "extra", "problem"),
    [
        (
            "digits",
            ["--target", "mnistm", "--branches", "3", "--strategy", "tpe", "--harmful-aux"],
            {"target": "mnistm", "harmful_aux": True},
        ),
        (
            "multimnist",
            ["--strategy", "binary", "--plan", "pairwise", "--option", "n_train=600"],
            {"target": "left", "n_train": 600},
        ),
    ],
)
def test_a_small_run_on_each_benchmark_prints_well_formed_json(
    tmp_path: Path, benchmark: str, extra: list[str], problem: dict[str, object]
) -> None:
    result = fm("run", "--benchmark", benchmark, *SMALL, *extra, "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    payload = json.loads(result.stdout)
    assert problem.items() <= payload["problem"].items()
    assert [r["method"] for r in payload["results"]] == ["stl", "ew", "forkmerge"]
    stl, ew, _ = payload["results"]
    assert stl["tg"] == 0.0 and isinstance(ew["tg"], float)
    for row in payload["results"]:
        assert 0.0 <= row["target_test"] <= 100.0 and row["seconds"] > 0
    merges = payload["forkmerge"]["merges"]
    assert [m["step"] for m in merges] == [20, 40]
    for merge in merges:
        assert abs(sum(merge["lambda"]) - 1.0) < 1e-9 and min(merge["lambda"]) >= 0.0
    assert len(payload["forkmerge"]["branches"]) == len(merges[0]["lambda"])


def test_the_table_names_every_method_and_the_lambda_of_each_merge(tmp_path: Path) -> None:
    result = fm("run", *SMALL, "--branches", "2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    for text in ("stl", "ew", "forkmerge", "TG vs STL", "round  1", "round  2", "Λ = ["):
        assert text in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["run", "--benchmark", "svhn"],
            "Parameter `benchmark` should be a shipped benchmark (digits, multimnist,",
        ),
        (
            ["run", "--target", "kanji"],
            "Parameter `target` should be one of mnist, mnistm, synfont, uci",
        ),
        (["run", "--strategy", "annealing"], "Parameter `strategy` should be one of binary, cmaes"),
        (["run", "--optimizer-policy", "zero"], "Parameter `optimizer_policy` should be one of"),
        (["run", "--dt", "0"], "Parameter `dt` should be a positive integer"),
        (["run", "--dt", "700"], "Parameter `dt` should be an integer from 1 to steps (600)"),
        (["run", "--branches", "1"], "Parameter `branches` should be an integer of at least 2"),
        (["run", "--branches", "9"], "Parameter `branches` should be an integer from 2 to 4"),
        (["run", "--merge-trials", "0"], "Parameter `merge_trials` should be a positive integer"),
        (["run", "--plan", "tree"], "Parameter `plan` should be one of"),
        (["run", "--dt", "abc"], "invalid int value: 'abc'"),
        (["tune", "studies/missing.toml"], "Parameter `spec` should be an existing TOML file"),
        (["compare", "studies/digits.toml", "--strategies", "grid,nope"], "Parameter `strategies`"),
        (
            ["run", "--data-dir", "somewhere"],
            "Parameter `data_dir` should be used only with --benchmark qm9, nyuv2, domainnet",
        ),
        (
            ["run", "--benchmark", "nyuv2", "--data-dir", "no/such/folder"],
            "Parameter `data_dir` should be a folder with the NYUv2",
        ),
        (["run", "--benchmark", "aliexpress"], "Parameter `data_dir`"),
        (["run", "--option", "image_size"], "Parameter `option` should be KEY=VALUE"),
        (["run", "--option", "colour=red"], "Parameter `colour` is not an option of the digits"),
        (["run", "--option", "target_train=-3"], "Parameter `target_train` should be a positive"),
        (
            ["run", "--optimizer", "lbfgs"],
            "Parameter `optimizer` should be one of adam, adamw, sgd",
        ),
        (["run", "--scheduler", "linear"], "Parameter `scheduler` should be one of cosine, none"),
        (["run", "--clip-grad-norm", "-1"], "Parameter `clip_grad_norm` should be a positive"),
        (["run", "--lr", "inf"], "Parameter `lr` should be a positive number"),
        (["run", "--momentum", "0.9"], "Parameter `momentum` should be 0 unless optimizer = sgd"),
        (["run", "--prune-sigmas", "-1"], "Parameter `prune_sigmas` should be a non-negative"),
        (
            ["compare", "--replay", "nowhere", "--prune-sigmas", "0,x"],
            "Parameter `prune_sigmas` should be a comma-separated list of non-negative numbers",
        ),
        (
            ["bench", "--grid-resolution=inf"],
            "Parameter `grid_resolution` should be a number in (0, 1]",
        ),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    tmp_path: Path, args: list[str], message: str
) -> None:
    (tmp_path / "studies").symlink_to(ROOT / "studies")
    result = fm(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert result.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["studies"]  # nothing written


def test_every_command_has_help(tmp_path: Path) -> None:
    for command in ("run", "bench", "tune", "compare"):
        result = fm(command, "--help", cwd=tmp_path)
        assert result.returncode == 0 and "usage: fm-optuna " + command in result.stdout


def test_run_resume_continues_forkmerge_after_its_last_merge(tmp_path: Path) -> None:
    """A run killed after its second merge, resumed with --resume, ends as if uninterrupted."""
    import torch

    from fm_optuna import cli
    from fm_optuna.core._checkpoints import Checkpointer, load_checkpoint
    from fm_optuna.core._events import EventStream, MergeCompleted, Observer
    from fm_optuna.core._loop import run_forkmerge

    common = [
        "run",
        "--methods",
        "forkmerge",
        "--dt",
        "10",
        "--steps",
        "40",
        "--branches",
        "3",
        "--strategy",
        "tpe",
        "--merge-trials",
        "4",
        "--no-tracking",
        "--json",
    ]
    full = fm(*common, "--checkpoint", str(tmp_path / "full.ckpt"), cwd=tmp_path)
    assert full.returncode == 0, full.stderr[-2000:]
    expected = [m["lambda"] for m in json.loads(full.stdout)["forkmerge"]["merges"]]

    class Killed(Exception):
        pass

    class KillAfterSecondMerge(Observer):
        def on_merge_completed(self, event: MergeCompleted) -> None:
            if event.round == 2:
                raise Killed

    # The same ForkMerge the command builds, interrupted after round 2 with its checkpoint.
    args = cli.build_parser().parse_args(common)
    torch.set_num_threads(1)
    problem, config = _run.run_problem(args), _run.run_config(args)
    partial = tmp_path / "partial.ckpt"
    with pytest.raises(Killed):
        run_forkmerge(problem, config, EventStream([Checkpointer(partial), KillAfterSecondMerge()]))
    assert load_checkpoint(partial)["round"] == 2

    resumed = fm(*common, "--checkpoint", str(partial), "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert [m["lambda"] for m in json.loads(resumed.stdout)["forkmerge"]["merges"]] == expected
    assert load_checkpoint(partial)["round"] == 4


def test_an_empty_study_file_names_the_missing_tables_and_writes_nothing(tmp_path: Path) -> None:
    (tmp_path / "empty.toml").write_text("")
    result = fm("tune", "empty.toml", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "missing: [study], [problem]" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and result.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.toml"]


def test_a_wrong_digits_option_lists_only_real_options(tmp_path: Path) -> None:
    result = fm("run", "--option", "colour=red", cwd=tmp_path)
    assert result.returncode == 2
    allowed = result.stderr.strip().split("its options are: ", 1)[1]
    assert "batch_size" in allowed and "unknown" not in allowed


@pytest.mark.parametrize("damage", ["truncated", "another configuration"])
def test_resume_from_a_bad_checkpoint_is_one_line_and_creates_no_store(
    tmp_path: Path, damage: str
) -> None:
    """Tracking is on: the checks run before the MLflow store would be created."""
    from fm_optuna.core._checkpoints import Checkpointer
    from fm_optuna.core._events import EventStream
    from fm_optuna.core._loop import ForkMergeConfig, run_forkmerge
    from tests.conftest import ToyProblem

    checkpoint = tmp_path / "run.ckpt"
    config = ForkMergeConfig(dt=10, total_steps=20, merge_trials=2, branches=2, ranking="given")
    run_forkmerge(ToyProblem(), config, EventStream([Checkpointer(checkpoint)]))
    if damage == "truncated":
        whole = checkpoint.read_bytes()
        checkpoint.write_bytes(whole[: len(whole) // 2])
    args = ["run", "--methods", "forkmerge", "--dt", "10", "--steps", "20", "--merge-trials", "2"]
    result = fm(*args, "--checkpoint", "run.ckpt", "--resume", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert "run.ckpt" in result.stderr and result.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.ckpt"]  # no tracking/mlflow.db


def test_training_hook_flags_reach_the_configuration() -> None:
    from fm_optuna.cli import build_parser
    from fm_optuna.cli._run import run_config

    flags = "--optimizer sgd --momentum 0.9 --weight-decay 1e-4 --scheduler step "
    flags += "--lr-step-size 50 --lr-gamma 0.5 --clip-grad-norm 1.5 --amp"
    args = build_parser().parse_args(["run", *flags.split()])
    config = run_config(args)
    assert (config.optimizer, config.momentum, config.weight_decay) == ("sgd", 0.9, 1e-4)
    assert (config.scheduler, config.lr_step_size, config.lr_gamma) == ("step", 50, 0.5)
    assert config.clip_grad_norm == 1.5 and config.amp is True
    default = run_config(build_parser().parse_args(["run"]))
    assert (default.optimizer, default.scheduler, default.clip_grad_norm, default.amp) == (
        "adam",
        "none",
        None,
        False,
    )


@pytest.mark.slow
def test_a_nan_loss_is_one_line_exit_1_and_a_failed_mlflow_run(tmp_path: Path) -> None:
    """SGD at lr 1e30 overflows the digits model at once: the loss of step 2 is NaN."""
    from fm_optuna.tracking import open_store

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = fm(
        "run", "--dt", "10", "--steps", "20", "--optimizer", "sgd", "--lr", "1e30",
        "--methods", "forkmerge", "--ranking", "given", "--tracking-uri", uri,
        "--experiment", "nan", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    # Without a terminal, stdout holds the progress lines only; the last says the run failed.
    progress = result.stdout.splitlines()
    assert progress and all(line.startswith("[forkmerge] ") for line in progress)
    assert progress[-1].startswith("[forkmerge] fail")
    (error,) = [line for line in result.stderr.splitlines() if "error:" in line]
    assert error.startswith("fm-optuna run: error: training loss became nan (task `uci` at step")
    assert "every branch of round 1 went non-finite" in error
    store = open_store(uri, experiment="nan")
    runs = store.client.search_runs([store.experiment_id])
    assert runs and {run.info.status for run in runs} == {"FAILED"}
    (parent,) = [run for run in runs if run.data.tags.get("fm_optuna.role") == "forkmerge"]
    assert parent.data.tags["fm_optuna.status"] == "FAIL"
    assert "every branch" in parent.data.tags["fm_optuna.fail_reason"]
    branches = [run for run in runs if run.data.tags.get("fm_optuna.role") == "branch"]
    assert all("fm_optuna.non_finite" in run.data.tags for run in branches)
