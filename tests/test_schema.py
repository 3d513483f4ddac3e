"""Every door (CLI flags, study files, the Python API) has the schema's defaults and allowed
values: an option defined once cannot drift between them."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

import fm_optuna
from fm_optuna import cli
from fm_optuna.cli._options import config_from
from fm_optuna.config import (
    ForkMergeConfig,
    RuntimeOptions,
    SchemaEntry,
    StudyOptions,
    key_table,
    schema,
)
from fm_optuna.errors import ConfigError
from fm_optuna.study._spec import load_spec

ROOT = Path(__file__).resolve().parents[1]
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
