"""Command-line options: benchmark defaults win unless a flag is given."""

from __future__ import annotations

from pathlib import Path

import pytest

from fm_optuna import cli
from fm_optuna.benchmarks import options
from fm_optuna.cli import _run
from fm_optuna.config import ForkMergeConfig
from fm_optuna.errors import ConfigError


def test_the_cli_keeps_the_benchmarks_own_batch_size_unless_told(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    built: list[dict[str, object]] = []
    monkeypatch.setattr(
        "fm_optuna.benchmarks.build_problem", lambda benchmark, **kwargs: built.append(kwargs)
    )
    parser = cli.build_parser()
    _run.run_problem(parser.parse_args(["run", "--benchmark", "qm9"]))
    _run.run_problem(parser.parse_args(["run", "--benchmark", "qm9", "--batch-size", "16"]))
    assert "batch_size" not in built[0]  # qm9's build() then uses its own 64
    assert built[1]["batch_size"] == 16


def test_catch_all_keywords_are_not_benchmark_options() -> None:
    assert "unknown" not in options("digits")
    assert "batch_size" in options("digits")


@pytest.mark.parametrize(
    ("flags", "evaluation"),
    [([], "exact"), (["--full-evaluation"], "full"), (["--pruned-evaluation"], "pruned")],
)
def test_how_candidates_are_evaluated_is_one_choice(flags: list[str], evaluation: str) -> None:
    args = cli.build_parser().parse_args(["run", *flags])
    assert _run.run_config(args).evaluation == evaluation


def test_full_and_pruned_evaluation_exclude_each_other(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.build_parser().parse_args(["run", "--full-evaluation", "--pruned-evaluation"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "--full-evaluation" in err and "not allowed" in err
    with pytest.raises(ConfigError, match=r"`full_evaluation`.*pruned_evaluation"):
        ForkMergeConfig(full_evaluation=True, pruned_evaluation=True)


def test_a_spec_command_takes_threads_from_the_study_file_unless_a_flag_says(
    tmp_path: Path,
) -> None:
    from fm_optuna.cli._common import runtime_of
    from fm_optuna.study._spec import load_spec

    path = tmp_path / "s.toml"
    path.write_text('[study]\nname = "s"\nthreads = 2\n[problem]\nbenchmark = "digits"\n')
    spec = load_spec(path)
    parser = cli.build_parser()
    assert runtime_of(parser.parse_args(["tune", str(path)]), spec).threads == 2
    assert runtime_of(parser.parse_args(["tune", str(path), "--threads", "1"]), spec).threads == 1
    assert runtime_of(parser.parse_args(["compare", "--replay", "x"])).threads == 1
