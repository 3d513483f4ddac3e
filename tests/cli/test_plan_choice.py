"""`cut` and `keep` (which ν^k Alg. 4 keeps) in the configuration, study specs and the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest

from fm_optuna.cli import main
from fm_optuna.config import ForkMergeConfig
from fm_optuna.errors import ConfigError
from fm_optuna.study._spec import check_branches_fit, load_spec
from tests.conftest import ToyProblem

SPEC = """
[study]
name = "s"
[problem]
benchmark = "digits"
[training]
steps = 40
dt = 20
{training}
[space]
{space}
"""


def spec_file(tmp_path: Path, training: str = "", space: str = "") -> Path:
    path = tmp_path / "study.toml"
    path.write_text(SPEC.format(training=training, space=space))
    return path


def test_config_takes_cut_and_keep_and_logs_keep_as_text() -> None:
    config = ForkMergeConfig(cut="spread", keep=(0, 1, 3))
    assert config.as_params()["keep"] == "0,1,3" and config.cut == "spread"
    assert ForkMergeConfig().cut == "auto"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"cut": "even"}, "Parameter `cut` should be one of auto, gaps, spread"),
        ({"keep": (1, 3)}, "Parameter `keep` should be increasing integers from 0"),
        ({"keep": (0, 2, 2, 3)}, "Parameter `keep` should be increasing integers"),
        ({"keep": (0, 1, 3), "branches": 4}, "Parameter `branches` should be 3"),
        ({"keep": (0, 1, 3), "plan": "pairwise"}, "Parameter `keep` should be used only with"),
    ],
)
def test_config_rejects_bad_plan_choices(values: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ForkMergeConfig(**values)


def test_spec_reads_cut_and_keep(tmp_path: Path) -> None:
    spec = load_spec(spec_file(tmp_path, 'cut = "gaps"\nkeep = [0, 2, 3]'))
    config = spec.config()
    assert (config.cut, config.keep) == ("gaps", (0, 2, 3))
    check_branches_fit(spec, ToyProblem(n_tasks=4))
    with pytest.raises(
        ConfigError, match=r"`training\.keep` should be increasing integers from 0 to 4"
    ):
        check_branches_fit(spec, ToyProblem(n_tasks=5))


@pytest.mark.parametrize(
    ("training", "space", "message"),
    [
        ('cut = "even"', "", "`training.cut` should be one of auto, gaps, spread"),
        ('keep = "0,1,3"', "", "`training.keep` should be a list of integers"),
        ("keep = [0, 3, 1]", "", "`training.keep` should be increasing integers"),
        ("keep = [0, 1, 3]", "branches = { low = 2, high = 3 }", "absent when training.keep"),
    ],
)
def test_spec_mistakes_in_cut_and_keep_are_one_line(
    tmp_path: Path, training: str, space: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")) as error:
        load_spec(spec_file(tmp_path, training, space))
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--keep", "0,x"], "Parameter `keep` should be comma-separated integers, e.g. 0,1,3."),
        (["--keep", "0,1,7"], "Parameter `keep` should be increasing integers from 0 to 3"),
        (["--cut", "even"], "Parameter `cut` should be one of auto, gaps, spread."),
    ],
)
def test_cli_plan_choices_fail_in_one_line_before_training(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    message: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["run", "--benchmark", "digits", "--no-tracking", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []
