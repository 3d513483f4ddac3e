"""Every door (CLI flags, study files, the Python API) has the schema's defaults and allowed
values: an option defined once cannot drift between them."""

from __future__ import annotations

import functools
import inspect
from pathlib import Path

import pytest
import torch

import fm_optuna
from examples.diabetes import build as diabetes
from fm_optuna import cli
from fm_optuna.cli._options import config_from
from fm_optuna.config import (
    ForkMergeConfig,
    RuntimeOptions,
    SchemaEntry,
    StudyOptions,
    key_table,
    option_of,
    schema,
)
from fm_optuna.errors import ConfigError
from fm_optuna.study._spec import load_spec

ROOT = Path(__file__).resolve().parents[1]
DIABETES = "examples.diabetes:build"
MINIMAL = '[study]\nname = "s"\n[problem]\nbenchmark = "digits"\n'
#: `fm-optuna bench` measures one fixed setting, on purpose not the schema's defaults.
BENCH_SETUP = {"dt": 200, "total_steps": 1500, "branches": 3}


def _study_file(section: str, key: str, value: str) -> str:
    """The minimal study file with ``key = value`` in ``[section]``."""
    if section == "study":
        return MINIMAL.replace('name = "s"\n', f'name = "s"\n{key} = {value}\n')
    return MINIMAL + f"[{section}]\n{key} = {value}\n"


def _flagged(*owners: type) -> list[SchemaEntry]:
    return [entry for entry in schema(*owners) if entry.flag != ""]


def _bad_value(entry: SchemaEntry) -> object:
    """A value of the right type just outside what the option allows."""
    option = entry.option
    if option.kind == "str" and option.choices:
        return "no-such-choice"
    if option.kind in ("int", "float") and option.low is not None:
        return (
            (option.low if option.low_open else option.low - 1)
            if option.kind == "int"
            else (float(option.low) if option.low_open else option.low - 0.5)
        )
    if option.kind in ("int", "float") and option.high is not None:
        return option.high + 1
    return None


RANGED = [e for e in schema(ForkMergeConfig) if _bad_value(e) is not None]


def test_every_run_flag_defaults_to_the_schema() -> None:
    args = cli.build_parser().parse_args(["run"])
    for entry in _flagged(ForkMergeConfig, RuntimeOptions):
        assert getattr(args, entry.name) == entry.default, entry.flag
    assert config_from(args) == ForkMergeConfig()


def test_bench_differs_from_the_schema_only_by_its_documented_setup() -> None:
    args = cli.build_parser().parse_args(["bench"])
    differing = {
        e.name: getattr(args, e.name)
        for e in _flagged(ForkMergeConfig)
        if getattr(args, e.name) != e.default
    }
    assert differing == BENCH_SETUP


def test_a_minimal_study_file_has_the_schema_defaults(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text(MINIMAL)
    spec = load_spec(path)
    assert spec.base == ForkMergeConfig()
    assert spec.study == StudyOptions(name="s")
    assert spec.runtime == RuntimeOptions()
    for entry in schema(ForkMergeConfig):
        if entry.option.section in ("training", "search"):
            view = spec.training if entry.option.section == "training" else spec.search
            assert getattr(view, entry.key) == entry.default


def test_the_api_defaults_are_the_schema_defaults() -> None:
    tune = inspect.signature(fm_optuna.tune).parameters
    for name in ("storage", "n_trials", "tracking_uri", "checkpoint_dir"):
        assert tune[name].default == getattr(StudyOptions, name), name
    search = inspect.signature(fm_optuna.search_merge).parameters
    assert search["strategy"].default == ForkMergeConfig.strategy
    assert search["budget"].default == ForkMergeConfig.merge_trials
    assert search["grid_resolution"].default == ForkMergeConfig.grid_resolution
    for verb in (fm_optuna.train_forkmerge, fm_optuna.compare_methods, fm_optuna.tune):
        threads = inspect.signature(verb).parameters["threads"]
        assert threads.default == RuntimeOptions.threads, verb.__name__
    for verb in (fm_optuna.train_forkmerge, fm_optuna.compare_methods):
        assert inspect.signature(verb).parameters["config"].default is None  # ForkMergeConfig()


@pytest.mark.parametrize("entry", RANGED, ids=lambda e: e.name)
def test_every_door_refuses_the_same_values_with_the_same_words(
    entry: SchemaEntry, tmp_path: Path
) -> None:
    bad = _bad_value(entry)
    allowed = entry.option.allowed(api=False)
    with pytest.raises(ConfigError) as api:
        ForkMergeConfig(**{entry.name: bad})
    assert entry.option.allowed() in str(api.value)
    if entry.flag:
        args = cli.build_parser().parse_args(["run", entry.flag, str(bad)])
        with pytest.raises(ConfigError) as flag:
            config_from(args)
        assert f"`{entry.key}` should be {entry.option.allowed()}" in str(flag.value)
    path = tmp_path / "s.toml"
    value = f'"{bad}"' if isinstance(bad, str) else repr(bad)
    path.write_text(_study_file(entry.option.section, entry.key, value))
    with pytest.raises(ConfigError) as spec:
        load_spec(path)
    assert f"`{entry.dotted}` should be {allowed}." in str(spec.value)


def test_every_choice_the_schema_allows_is_accepted_by_every_door(tmp_path: Path) -> None:
    for entry in schema(ForkMergeConfig):
        for choice in entry.option.choices:
            extra = {"keep": None} if entry.name == "plan" else {}
            assert getattr(ForkMergeConfig(**{entry.name: choice, **extra}), entry.name) == choice
            args = cli.build_parser().parse_args(["run", entry.flag, choice])
            assert getattr(config_from(args), entry.name) == choice
            path = tmp_path / "s.toml"
            path.write_text(_study_file(entry.option.section, entry.key, f'"{choice}"'))
            assert getattr(load_spec(path).base, entry.name) == choice


#: Device values every door refuses, on a node with ``gpus`` CUDA devices, and what is allowed.
BAD_DEVICES = [
    ("cuda:0,cuda:1", False, 2, "one device unless parallel_branches = true (then one per branch)"),
    ("cuda:0,cuda:1", True, 0, "cpu (no CUDA device is available)"),
    ("cuda:0,cuda:5", True, 2, "CUDA devices among cuda:0 to cuda:1 (this machine has 2)"),
    ("cuda:3", False, 2, "cpu or cuda:0 to cuda:1 (this machine has 2)"),
    ("cuda:1,cuda:1", True, 2, "distinct CUDA devices (each one serves its branches)"),
    (
        "cpu,cpu",
        True,
        2,
        "CUDA devices when it lists several (on the CPU parallel_branches trains one process "
        "per branch: device = cpu)",
    ),
    ("gpu", False, 0, option_of(RuntimeOptions, "device").allowed()),
]


def _gpus(monkeypatch: pytest.MonkeyPatch, count: int) -> None:
    """What torch reports on a node with ``count`` CUDA devices (nothing runs on them)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


@pytest.mark.parametrize(("value", "parallel", "gpus", "allowed"), BAD_DEVICES)
def test_every_door_refuses_the_same_devices_with_the_same_words_and_writes_nothing(
    value: str,
    parallel: bool,
    gpus: int,
    allowed: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _gpus(monkeypatch, gpus)
    monkeypatch.chdir(tmp_path)
    words = f"should be {allowed}. Found"
    run = ["run", "--benchmark", DIABETES, "--no-tracking", "--device", value]
    assert cli.main(run + (["--parallel-branches"] if parallel else [])) == 2
    line = f"Parameter `device` {words} `device = {value}`."
    assert capsys.readouterr().err == f"fm-optuna run: error: {line}\n"
    path = tmp_path / "s.toml"
    study = f'[study]\nname = "s"\ndevice = "{value}"\n[problem]\nbenchmark = "{DIABETES}"\n'
    path.write_text(study + f"[training]\nparallel_branches = {str(parallel).lower()}\n")
    assert cli.main(["tune", str(path), "--no-tracking"]) == 2
    in_file = f"{path}: Parameter `study.device` {words} `study.device = {value}`."
    assert capsys.readouterr().err == f"fm-optuna tune: error: {in_file}\n"
    config = ForkMergeConfig(dt=2, total_steps=4, parallel_branches=parallel)
    factory = functools.partial(diabetes, target="progression")
    with pytest.raises(ConfigError) as trained:
        fm_optuna.train_forkmerge(factory, config, device=value)
    space = {"dt": {"low": 1, "high": 2}}
    with pytest.raises(ConfigError) as tuned:
        fm_optuna.tune(factory, space, study_name="s", config=config, device=value)
    assert str(trained.value) == str(tuned.value) == line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.toml"]  # no store, no checkpoint


def test_a_built_problem_trains_where_it_lives_and_a_factory_where_it_is_told() -> None:
    config = ForkMergeConfig(dt=2, total_steps=4, strategy="grid", grid_resolution=0.5)
    built = fm_optuna.train_forkmerge(diabetes(target="progression"), config, device="cpu")
    told = fm_optuna.train_forkmerge(
        functools.partial(diabetes, target="progression"), config, device="cpu"
    )
    assert built.lambda_history == told.lambda_history
    with pytest.raises(ConfigError) as elsewhere:
        fm_optuna.train_forkmerge(diabetes(target="progression"), config, device="cpu,cpu")
    assert str(elsewhere.value).startswith("Parameter `device` should be one device unless")
    with pytest.raises(ConfigError) as not_a_problem:
        fm_optuna.train_forkmerge("diabetes", config)  # type: ignore[arg-type]
    assert str(not_a_problem.value) == (
        "Parameter `problem` should be a Problem or a factory called as factory(device=...). "
        "Found `problem = 'diabetes'`."
    )


def test_the_study_file_key_table_is_the_schemas() -> None:
    text = (ROOT / "studies" / "README.md").read_text()
    begin = text.index("-->", text.index("<!-- keys:begin")) + 3
    table = text[begin : text.index("<!-- keys:end -->")].strip()
    assert table == key_table(), "regenerate it with `python -m fm_optuna.config`"


def test_every_schema_key_is_a_study_file_key_and_a_flag_unless_marked() -> None:
    flags = {
        a.dest for a in cli.build_parser()._subparsers._group_actions[0].choices["run"]._actions
    }
    for entry in schema(ForkMergeConfig, RuntimeOptions):
        assert entry.name in flags, entry.name
