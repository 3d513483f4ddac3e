"""A study knows its configuration: a resumed study trained differently is refused before anything
is trained or written, continued on purpose as a new tagged version, and never reuses the
baselines of the old configuration."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState, create_trial

from fm_optuna.errors import ConfigError
from fm_optuna.study._fingerprint import (
    ENTRY_PREFIX,
    VERSION_ATTR,
    configuration_record,
    differences,
    fingerprint,
    refusal,
    settle,
)
from fm_optuna.study._spec import load_spec
from fm_optuna.study._tuner import Tuner
from tests.conftest import ToyProblem

SPEC = """
[study]
name = "toy"
n_trials = {n_trials}
seed = 0
storage = "sqlite:///{folder}/optuna.db"
heartbeat_seconds = {heartbeat}
checkpoint_dir = "{folder}/checkpoints"
pruner = "none"
baselines = {baselines}
[problem]
benchmark = "{benchmark}"
{problem}
[training]
steps = 40
dt = 20
branches = 2
ranking = "given"
{training}
[search]
strategy = "tpe"
merge_trials = 3
[space]
dt = {{ low = 10, high = 20 }}
"""
ADAMW = 'optimizer = "adamw"'
SGD = 'optimizer = "sgd"\nmomentum = 0.9'


def spec_file(
    folder: Path,
    *,
    training: str = ADAMW,
    n_trials: int = 1,
    heartbeat: int = 1,
    baselines: str = "[]",
    benchmark: str = "digits",
    problem: str = "",
    name: str = "toy.toml",
) -> Path:
    path = folder / name
    path.write_text(
        SPEC.format(
            folder=folder,
            training=training,
            n_trials=n_trials,
            heartbeat=heartbeat,
            baselines=baselines,
            benchmark=benchmark,
            problem=problem,
        )
    )
    return path


def load(folder: Path) -> optuna.Study:
    return optuna.load_study(study_name="toy", storage=f"sqlite:///{folder / 'optuna.db'}")


def tracked(uri: str):  # type: ignore[no-untyped-def]
    from fm_optuna.tracking import study_tracking

    return study_tracking(uri, "toy")


def mlflow_runs(uri: str) -> list[object]:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    return list(client.search_runs(experiments))


# --- the record ---------------------------------------------------------------------------------


def test_the_record_holds_what_trains_and_no_budget_or_operational_key(tmp_path: Path) -> None:
    record = configuration_record(load_spec(spec_file(tmp_path)))
    assert record["training.optimizer"] == "adamw" and record["training.steps"] == 40
    assert record["problem.benchmark"] == "digits" and record["study.seed"] == 0
    assert record["search.strategy"] == "tpe" and record["search.merge_trials"] == 3
    assert record["space.dt.low"] == 10 and record["space.dt.high"] == 20
    assert "training.dt" not in record  # searched: the space's range stands for it
    assert record["training.branches"] == 2  # fixed: trials train with it
    assert not any(key.startswith("study.") and key != "study.seed" for key in record)
    assert "search.save_merge_problems" not in record and "config.log_every" not in record

    # Budget and operational keys change neither the record nor its fingerprint.
    (tmp_path / "other").mkdir()
    other = spec_file(tmp_path / "other", n_trials=7, heartbeat=5, baselines='["stl"]')
    assert configuration_record(load_spec(other)) == record
    assert fingerprint(configuration_record(load_spec(other))) == fingerprint(record)
    changed = configuration_record(load_spec(spec_file(tmp_path, training=SGD, name="sgd.toml")))
    assert fingerprint(changed) != fingerprint(record)


def test_problem_options_and_the_resolved_target_are_recorded(tmp_path: Path) -> None:
    spec = load_spec(spec_file(tmp_path, problem='target = "uci"\nbatch_size = 16'))
    record = configuration_record(spec, target="uci")
    assert record["problem.target"] == "uci" and record["problem.batch_size"] == 16


def test_differences_name_each_key_with_both_values() -> None:
    old = {"training.optimizer": "adamw", "training.momentum": 0.0, "training.keep": None}
    new = {"training.optimizer": "sgd", "training.momentum": 0.9, "training.keep": "0,1"}
    assert differences(old, new) == [
        "training.optimizer adamw → sgd",
        "training.momentum 0 → 0.9",
        "training.keep unset → 0,1",
    ]
    assert differences(old, dict(old)) == []
    assert differences({"space.dt.low": 10}, {}) == ["space.dt.low 10 → unset"]
    assert differences({}, {"problem.batch_size": 16}) == ["problem.batch_size unset → 16"]


def test_an_option_added_since_the_record_counts_as_its_default() -> None:
    """A key an older record lacks, at the study-file default, is no change (an option added to
    fm-optuna later trains as before at its default); at another value it is one."""
    assert differences({}, {"training.amp": False}) == []
    assert differences({}, {"training.amp": True}) == ["training.amp unset → true"]
    assert differences({"training.clip_grad_norm": None}, {}) == []


def test_settle_records_keeps_refuses_or_adds_a_version() -> None:
    record = {"training.optimizer": "adamw"}
    first = settle({}, record, allow_change=False, n_trials=0)
    assert first.version.number == 1 and not first.version.adopted and not first.refused
    assert list(first.write) == [f"{ENTRY_PREFIX}1", VERSION_ATTR]  # the entry before the number
    attrs = dict(first.write)

    same = settle(attrs, dict(record), allow_change=False, n_trials=3)
    assert same.write == {} and same.version == first.version

    changed = {"training.optimizer": "sgd"}
    refused = settle(attrs, changed, allow_change=False, n_trials=3)
    assert refused.refused and refused.write == {}
    assert refused.changes == ("training.optimizer adamw → sgd",)

    second = settle(attrs, changed, allow_change=True, n_trials=3)
    assert second.version.number == 2 and second.version.first_trial == 3
    assert second.write[VERSION_ATTR] == 2
    assert second.write[f"{ENTRY_PREFIX}2"]["fingerprint"] == fingerprint(changed)

    adopted = settle({"baselines": {}}, record, allow_change=False, n_trials=5)
    assert adopted.version.adopted and adopted.version.first_trial == 5


def test_the_refusal_is_one_line_naming_the_changes_and_both_ways_on() -> None:
    attrs = settle({}, {"a": 1, "b": 2}, allow_change=False, n_trials=0).write
    refused = settle(attrs, {"a": 3, "b": 4}, allow_change=False, n_trials=1)
    message = str(refusal("s.toml", "toy", refused, override="--allow-config-change"))
    assert message == (
        "s.toml: study `toy` was created with a different configuration: a 1 → 3, b 2 → 4. "
        "Use a new study name, or pass --allow-config-change to continue it on purpose (trials "
        "trained after the change are tagged)."
    )
    many = settle(attrs, {f"k{i}": i for i in range(9)}, allow_change=False, n_trials=1)
    text = str(refusal("s.toml", "toy", many, override="x"))
    assert "\n" not in text and "and 5 more" in text


# --- the tuner ----------------------------------------------------------------------------------


def test_a_changed_spec_is_refused_before_anything_is_trained_or_written(tmp_path: Path) -> None:
    mlflow = f"sqlite:///{tmp_path / 'mlflow.db'}"
    Tuner(load_spec(spec_file(tmp_path)), problem=ToyProblem(), tracking=tracked(mlflow)).run()
    runs = len(mlflow_runs(mlflow))
    study = load(tmp_path)
    attrs = dict(study.user_attrs)
    assert attrs[VERSION_ATTR] == 1 and study.trials[0].user_attrs["config_version"] == 1

    path = spec_file(tmp_path, training=SGD, n_trials=2)
    fresh = f"sqlite:///{tmp_path / 'fresh' / 'mlflow.db'}"
    for uri in (mlflow, fresh):
        with pytest.raises(ConfigError) as error:
            Tuner(load_spec(path), problem=ToyProblem(), tracking=tracked(uri)).run()
        assert str(error.value) == (
            f"{path}: study `toy` was created with a different configuration: "
            "training.optimizer adamw → sgd, training.momentum 0 → 0.9. Use a new study name, "
            "or pass --allow-config-change to continue it on purpose (trials trained after the "
            "change are tagged)."
        )
    assert len(load(tmp_path).trials) == 1 and dict(load(tmp_path).user_attrs) == attrs
    assert len(mlflow_runs(mlflow)) == runs
    assert not (tmp_path / "fresh").exists()  # not even the tracking store was created


def test_continuing_on_purpose_adds_a_version_and_tags_the_new_trials(tmp_path: Path) -> None:
    mlflow = f"sqlite:///{tmp_path / 'mlflow.db'}"
    Tuner(load_spec(spec_file(tmp_path)), problem=ToyProblem(), tracking=tracked(mlflow)).run()
    Tuner(
        load_spec(spec_file(tmp_path, training=SGD, n_trials=2)),
        problem=ToyProblem(),
        tracking=tracked(mlflow),
        allow_config_change=True,
    ).run()
    study = load(tmp_path)
    assert [t.user_attrs["config_version"] for t in study.trials] == [1, 2]
    assert study.user_attrs[VERSION_ATTR] == 2
    v1, v2 = study.user_attrs[f"{ENTRY_PREFIX}1"], study.user_attrs[f"{ENTRY_PREFIX}2"]
    assert v1["record"]["training.optimizer"] == "adamw" and v2["first_trial"] == 1
    assert v2["record"]["training.optimizer"] == "sgd" and v2["record"]["training.momentum"] == 0.9
    assert study.trials[1].user_attrs["config_fingerprint"] == v2["fingerprint"]
    from mlflow import MlflowClient

    run = MlflowClient(mlflow).get_run(study.trials[1].user_attrs["mlflow_run_id"])
    assert run.data.tags["fm_optuna.config_version"] == "2"
    assert run.data.tags["fm_optuna.config_fingerprint"] == v2["fingerprint"]

    # The new version is what the study now knows: the same spec again needs no flag, the old
    # one does.
    Tuner(load_spec(spec_file(tmp_path, training=SGD, n_trials=3)), problem=ToyProblem()).run()
    assert load(tmp_path).trials[2].user_attrs["config_version"] == 2
    with pytest.raises(ConfigError, match=r"continued \(configuration version 2\) with a diff"):
        Tuner(load_spec(spec_file(tmp_path, n_trials=4)), problem=ToyProblem())


def test_a_budget_only_change_is_accepted_silently(tmp_path: Path) -> None:
    Tuner(load_spec(spec_file(tmp_path)), problem=ToyProblem()).run()
    Tuner(load_spec(spec_file(tmp_path, n_trials=2, heartbeat=3)), problem=ToyProblem()).run()
    study = load(tmp_path)
    assert [t.user_attrs["config_version"] for t in study.trials] == [1, 1]
    assert study.user_attrs[VERSION_ATTR] == 1 and f"{ENTRY_PREFIX}2" not in study.user_attrs


def test_a_study_made_before_records_were_kept_is_adopted(tmp_path: Path) -> None:
    study = optuna.create_study(
        study_name="toy", storage=f"sqlite:///{tmp_path / 'optuna.db'}", direction="minimize"
    )
    study.add_trial(create_trial(value=1.0, params={}, distributions={}))
    Tuner(load_spec(spec_file(tmp_path, n_trials=2)), problem=ToyProblem()).run()
    study = load(tmp_path)
    entry = study.user_attrs[f"{ENTRY_PREFIX}1"]
    assert entry["adopted"] and entry["first_trial"] == 1 and study.user_attrs[VERSION_ATTR] == 1
    assert study.trials[1].state == TrialState.COMPLETE


def test_baselines_are_keyed_by_the_configuration(tmp_path: Path) -> None:
    Tuner(load_spec(spec_file(tmp_path, baselines='["stl"]')), problem=ToyProblem()).run()
    Tuner(
        load_spec(spec_file(tmp_path, training=SGD, n_trials=2, baselines='["stl"]')),
        problem=ToyProblem(),
        allow_config_change=True,
    ).run()
    attrs = load(tmp_path).user_attrs
    keys = [key for key in attrs if key.startswith("baseline:stl ")]
    assert len(keys) == 2  # trained again under the new configuration, not reused
    for number in (1, 2):
        fp = attrs[f"{ENTRY_PREFIX}{number}"]["fingerprint"]
        assert sum(f"'config': '{fp}'" in key for key in keys) == 1


# --- the command line and the API ---------------------------------------------------------------


def test_the_command_line_refuses_in_one_line_with_exit_2_and_takes_the_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fm_optuna.cli import main

    diabetes = 'benchmark = "examples.diabetes:build"'
    first = spec_file(tmp_path, benchmark="examples.diabetes:build", problem="hidden = 8")
    assert diabetes in first.read_text()
    assert main(["tune", str(first), "--no-tracking", "--json"]) == 0
    capsys.readouterr()

    changed = spec_file(
        tmp_path,
        benchmark="examples.diabetes:build",
        problem="hidden = 8",
        training=SGD,
        n_trials=2,
        name="changed.toml",
    )
    mlflow = tmp_path / "mlflow" / "mlflow.db"
    assert main(["tune", str(changed), "--tracking-uri", f"sqlite:///{mlflow}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("fm-optuna tune: error: ")
    assert "training.optimizer adamw → sgd, training.momentum 0 → 0.9" in err
    assert "--allow-config-change" in err
    assert len(load(tmp_path).trials) == 1 and not mlflow.parent.exists()

    assert main(["tune", str(changed), "--no-tracking", "--json", "--allow-config-change"]) == 0
    assert [t.user_attrs["config_version"] for t in load(tmp_path).trials] == [1, 2]


def test_the_api_names_its_keyword(tmp_path: Path) -> None:
    from fm_optuna import ForkMergeConfig, tune

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    common = {
        "study_name": "api",
        "storage": storage,
        "checkpoint_dir": str(tmp_path / "checkpoints"),
    }
    config = ForkMergeConfig(dt=20, total_steps=40, branches=2, ranking="given", merge_trials=2)
    tune(ToyProblem(), {"dt": {"low": 10, "high": 20}}, n_trials=1, config=config, **common)
    sgd = ForkMergeConfig(
        dt=20, total_steps=40, branches=2, ranking="given", merge_trials=2, optimizer="sgd"
    )
    with pytest.raises(ConfigError, match=r"training.optimizer adam → sgd\. .*allow_config_chan"):
        tune(ToyProblem(), {"dt": {"low": 10, "high": 20}}, n_trials=2, config=sgd, **common)
    report = tune(
        ToyProblem(),
        {"dt": {"low": 10, "high": 20}},
        n_trials=2,
        config=sgd,
        allow_config_change=True,
        **common,
    )
    assert len(report.trials) == 2
