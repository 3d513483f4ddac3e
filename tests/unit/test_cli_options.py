"""Command-line options: benchmark defaults win unless a flag is given."""

from __future__ import annotations

import pytest

from fm_optuna import cli
from fm_optuna.benchmarks import options


def test_the_cli_keeps_the_benchmarks_own_batch_size_unless_told(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    built: list[dict[str, object]] = []
    monkeypatch.setattr(
        "fm_optuna.benchmarks.build_problem", lambda benchmark, **kwargs: built.append(kwargs)
    )
    parser = cli.build_parser()
    cli._problem(parser.parse_args(["run", "--benchmark", "qm9"]))
    cli._problem(parser.parse_args(["run", "--benchmark", "qm9", "--batch-size", "16"]))
    assert "batch_size" not in built[0]  # qm9's build() then uses its own 64
    assert built[1]["batch_size"] == 16


def test_catch_all_keywords_are_not_benchmark_options() -> None:
    assert "unknown" not in options("digits")
    assert "batch_size" in options("digits")
