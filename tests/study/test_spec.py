"""Study specifications: the shipped specs load; every mistake names the file and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from fm_optuna.errors import ConfigError
from fm_optuna.problem._tasks import Problem
from fm_optuna.study._spec import check_branches_fit, load_spec

STUDIES = Path(__file__).resolve().parents[2] / "studies"

GOOD = """
[study]
name = "s"
n_trials = 3
[problem]
benchmark = "digits"
target = "uci"
[training]
steps = 200
dt = 50
[search]
strategy = "tpe"
merge_trials = 5
[space]
dt = { low = 20, high = 100, log = true }
branches = { low = 2, high = 3 }
lr = { low = 1e-4, high = 1e-2, log = true }
optimizer_policy = ["keep", "reset"]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "study.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", sorted(p.name for p in STUDIES.glob("*.toml")))
def test_shipped_specs_load(name: str) -> None:
    spec = load_spec(STUDIES / name)
    assert spec.study.name and spec.study.n_trials >= 1
    assert spec.config().total_steps == spec.training.steps


def test_a_full_spec_parses_into_typed_sections(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, GOOD))
    assert spec.space.dt is not None and (
        spec.space.dt.low,
        spec.space.dt.high,
        spec.space.dt.log,
    ) == (20, 100, True)
    assert spec.space.optimizer_policy == ("keep", "reset")
    assert spec.config(dt=30, branches=3).dt == 30
    assert spec.search.strategy == "tpe" and spec.study.storage.startswith("sqlite:///")


@pytest.mark.parametrize(
    ("change", "key", "allowed"),
    [
        (("[training]", "[training]\nspeed = 3"), "training.speed", "allowed keys"),
        (("steps = 200", 'steps = "200"'), "training.steps", "a positive integer"),
        (("low = 20, high = 100", "low = 100, high = 20"), "space.dt", "non-empty range"),
        (("branches = { low = 2", "branches = { low = 1"), "space.branches.low", "an integer ≥ 2"),
        (("low = 20, high = 100", "low = 0, high = 100"), "space.dt.low", "an integer ≥ 1"),
        (("low = 20, high = 100", "low = 20, high = 300"), "space.dt", "within 1..training.steps"),
        (("dt = 50", "dt = 500"), "training.dt", "an integer from 1 to steps (200)"),
        (('strategy = "tpe"', 'strategy = "sgd"'), "search.strategy", "one of"),
        (('target = "uci"', 'target = "svhn"'), "problem.target", "one of"),
        (("[study]", "[studies]"), "studies", "allowed keys"),
        (("n_trials = 3", "n_trials = 0"), "study.n_trials", "a positive integer"),
        (("dt = 50", 'dt = 50\noptimizer = "lbfgs"'), "training.optimizer", "one of adam"),
        (
            ("dt = 50", 'dt = 50\nscheduler = "linear"'),
            "training.scheduler",
            "one of cosine, none, step.",
        ),
        (("dt = 50", "dt = 50\nclip_grad_norm = 0"), "training.clip_grad_norm", "positive"),
        (("dt = 50", "dt = 50\nclip_grad_norm = nan"), "training.clip_grad_norm", "positive"),
        (("dt = 50", "dt = 50\nmomentum = inf"), "training.momentum", "a number in [0, 1)"),
        (("dt = 50", 'dt = 50\namp = "yes"'), "training.amp", "true or false"),
        (("dt = 50", "dt = 50\nmomentum = 0.9"), "training.momentum", "0 unless optimizer = sgd"),
        (
            ('strategy = "tpe"', 'strategy = "tpe"\nprune_sigmas = -1'),
            "search.prune_sigmas",
            "a non-negative number",
        ),
        (
            (
                'strategy = "tpe"',
                'strategy = "tpe"\nfull_evaluation = true\npruned_evaluation = true',
            ),
            "search.full_evaluation",
            "false when pruned_evaluation is true",
        ),
    ],
)
def test_mistakes_name_the_file_and_the_key(
    tmp_path: Path, change: tuple[str, str], key: str, allowed: str
) -> None:
    path = write(tmp_path, GOOD.replace(*change, 1))
    with pytest.raises(ConfigError) as error:
        load_spec(path)
    message = str(error.value)
    assert str(path) in message and f"`{key}" in message and allowed in message
    assert "\n" not in message


def test_missing_file_and_broken_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="existing TOML file"):
        load_spec(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_spec(write(tmp_path, "[study\nname="))


def test_branches_must_fit_the_problem(tmp_path: Path, toy_problem: Problem) -> None:
    spec = load_spec(write(tmp_path, GOOD.replace("high = 3 }", "high = 6 }")))
    with pytest.raises(ConfigError, match=r"space\.branches\.high.*at most 4 \(the tasks of toy\)"):
        check_branches_fit(spec, toy_problem)
    check_branches_fit(load_spec(write(tmp_path, GOOD)), toy_problem)


@pytest.mark.parametrize(
    ("text", "missing"),
    [
        ("", "[study], [problem]"),
        ("# nothing yet\n", "[study], [problem]"),
        ('[problem]\nbenchmark = "digits"\n', "[study]"),
        ('[study]\nname = "s"\n', "[problem]"),
    ],
)
def test_a_file_without_its_study_or_problem_table_is_one_line(
    tmp_path: Path, text: str, missing: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as error:
        load_spec(path)
    message = str(error.value)
    assert str(path) in message and f"missing: {missing}." in message
    assert "\n" not in message


def test_training_hooks_from_the_spec_reach_the_configuration(tmp_path: Path) -> None:
    hooks = """dt = 50
optimizer = "sgd"
momentum = 0.9
weight_decay = 1e-4
scheduler = "step"
lr_step_size = 40
lr_gamma = 0.5
clip_grad_norm = 2.0
amp = true"""
    config = load_spec(write(tmp_path, GOOD.replace("dt = 50", hooks, 1))).config()
    assert (config.optimizer, config.momentum, config.weight_decay) == ("sgd", 0.9, 1e-4)
    assert (config.scheduler, config.lr_step_size, config.lr_gamma) == ("step", 40, 0.5)
    assert config.clip_grad_norm == 2.0 and config.amp is True
    default = load_spec(write(tmp_path, GOOD)).config()
    assert (default.optimizer, default.scheduler, default.clip_grad_norm) == ("adam", "none", None)


def test_prune_sigmas_reaches_the_run_configuration(tmp_path: Path) -> None:
    spec = load_spec(
        write(tmp_path, GOOD.replace('strategy = "tpe"', 'strategy = "tpe"\nprune_sigmas = 1.5', 1))
    )
    assert spec.search.prune_sigmas == 1.5 and spec.config().prune_sigmas == 1.5


@pytest.mark.parametrize(
    ("lines", "evaluation"),
    [("", "exact"), ("full_evaluation = true", "full"), ("pruned_evaluation = true", "pruned")],
)
def test_how_candidates_are_evaluated_reaches_the_run_configuration(
    tmp_path: Path, lines: str, evaluation: str
) -> None:
    text = GOOD.replace('strategy = "tpe"', f'strategy = "tpe"\n{lines}', 1)
    assert load_spec(write(tmp_path, text)).config().evaluation == evaluation
