"""Problems from outside the package: module:factory, installed plugins, study files, the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from fm_optuna import cli
from fm_optuna.benchmarks import build_problem, resolve
from fm_optuna.errors import ConfigError
from fm_optuna.study._spec import check_branches_fit, load_spec

ROOT = Path(__file__).resolve().parents[2]

MODULE = """
from tests.conftest import ToyProblem


class Six(ToyProblem):
    def __init__(self, *, target, seed, device, width=16):
        super().__init__(n_tasks=6)
        self.target, self.width = target, width

    def describe(self):  # no `benchmark` key: the reports must not need one
        return {"width": self.width}


def build(*, target="t0", seed=0, device=None, width=16):
    return Six(target=target, seed=seed, device=device, width=width)


def build_any(*, target="t0", seed=0, device=None, **options):
    problem = Six(target=target, seed=seed, device=device)
    problem.options = options
    return problem


def not_a_problem(*, target="t0", seed=0, device=None):
    return 42


class AllShared(Six):
    def shared_parameters(self, model):
        return list(model.parameters())


def build_all_shared(*, target="t0", seed=0, device=None):
    return AllShared(target=target, seed=seed, device=device)
"""


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """``userprob.py`` in a fresh working directory (importable from there, as for -m)."""
    (tmp_path / "userprob.py").write_text(MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    yield tmp_path
    sys.modules.pop("userprob", None)


def test_module_factory_builds_with_its_options(user_module: Path) -> None:
    source = resolve("userprob:build")
    assert source.options == ("width",) and not source.any_option and source.targets is None
    problem = build_problem("userprob:build", target="t5", width=8)
    assert (problem.target, problem.width, len(problem.tasks)) == ("t5", 8, 6)


def test_a_factory_with_var_keywords_takes_any_option(user_module: Path) -> None:
    problem = build_problem("userprob:build_any", colour="red", depth=3)
    assert problem.options == {"colour": "red", "depth": 3}


@pytest.mark.parametrize(
    ("name", "extra", "message"),
    [
        ("userprob:build", {"colour": "red"}, "`colour` is not an option of the userprob:build"),
        ("userprob:build", {"target": "t9"}, "the target should be one of its tasks (t0, t1,"),
        ("userprob:missing", {}, "userprob has no attribute `missing`"),
        ("nosuchmodule:build", {}, "should name an importable module"),
        ("userprob:not_a_problem", {}, "should return a fm_optuna.Problem. Found int"),
        ("userprob", {}, "Parameter `benchmark` should be a shipped benchmark"),
    ],
)
def test_mistakes_are_config_errors(
    user_module: Path, name: str, extra: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        build_problem(name, **extra)  # type: ignore[arg-type]
    assert message in str(caught.value)


def test_a_study_file_names_the_factory_and_validates_against_its_tasks(
    user_module: Path,
) -> None:
    spec_path = user_module / "study.toml"
    spec_path.write_text(
        textwrap.dedent(
            """
            [study]
            name = "six"
            [problem]
            benchmark = "userprob:build"
            target = "t3"
            width = 4
            [training]
            steps = 40
            dt = 20
            [space]
            branches = { low = 2, high = 5 }
            """
        )
    )
    spec = load_spec(spec_path)
    problem = spec.build_problem(device=None)
    assert (problem.target, problem.width) == ("t3", 4)
    check_branches_fit(spec, problem)  # L up to 5 fits the problem's own 6 tasks

    spec_path.write_text(spec_path.read_text().replace("width = 4", "colour = 4"))
    with pytest.raises(ConfigError, match=r"unknown key `problem.colour`; allowed keys: .*width"):
        load_spec(spec_path)
    spec_path.write_text(spec_path.read_text().replace("userprob:build", "userprob:nope"))
    with pytest.raises(ConfigError, match=r"study.toml: .*userprob has no attribute `nope`"):
        load_spec(spec_path)


def test_cli_runs_a_module_factory_whose_describe_has_no_benchmark_key(
    user_module: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["run", "--benchmark", "userprob:build", "--target", "t1", "--option", "width=8"]
    small = ["--dt", "2", "--steps", "4", "--branches", "2", "--no-tracking"]
    assert cli.main([*args, *small, "--methods", "stl,forkmerge", "--ranking", "given"]) == 0
    out = capsys.readouterr().out
    assert "benchmark toy  target t1  metric mse" in out and "round  2" in out


def test_cli_refuses_a_bad_target_in_one_line_and_writes_nothing(
    user_module: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = sorted(p.name for p in user_module.iterdir())
    assert cli.main(["run", "--benchmark", "userprob:build", "--target", "t9"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fm-optuna run: error: Problem `toy`: the target should be one of")
    assert len(err.strip().splitlines()) == 1
    after = sorted(p.name for p in user_module.iterdir() if p.name != "__pycache__")
    assert after == before


def _fake_installed_plugin(folder: Path) -> None:
    """An installed distribution as pip leaves it: a dist-info folder with entry_points.txt."""
    (folder / "toyplugin.py").write_text(MODULE)
    info = folder / "toyplugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toyplugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[fm_optuna.problems]\nsix = toyplugin:build\n")


def test_an_entry_point_plugin_is_resolved_and_listed_by_help(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_installed_plugin(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert resolve("six").options == ("width",)
        assert build_problem("six", target="t4").target == "t4"
    finally:
        sys.modules.pop("toyplugin", None)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    result = subprocess.run(
        [sys.executable, "-m", "fm_optuna.cli", "run", "--help"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "installed plugins: six" in " ".join(result.stdout.split())


def test_tune_refuses_a_broken_problem_before_any_study_or_store(
    user_module: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (user_module / "study.toml").write_text(
        '[study]\nname = "six"\n[problem]\nbenchmark = "userprob:build"\ntarget = "t9"\n'
        "[space]\ndt = { low = 2, high = 4 }\n"
    )
    assert cli.main(["tune", "study.toml"]) == 2
    err = capsys.readouterr().err
    assert "study.toml: Problem `toy`: the target should be one of its tasks" in err
    assert not (user_module / "tracking").exists()  # no Optuna study, no MLflow store


def test_cli_prints_the_heads_warning_as_one_line(
    user_module: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["run", "--benchmark", "userprob:build_all_shared", "--steps", "2", "--dt", "2"]
    assert cli.main([*args, "--methods", "stl", "--no-tracking"]) == 0
    err = capsys.readouterr().err
    line = "fm-optuna run: warning: Problem `toy`: shared_parameters(model) returns every"
    assert line in err and "treat the task heads as trunk" in err and "Traceback" not in err
