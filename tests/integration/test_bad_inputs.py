"""Issue 18, items 6 to 9: check order, inputs that passed the problem check and broke later,
misleading messages, and the smaller faults (pruning at the last step, shared checkpoints, runs
left RUNNING, per-trial checkpoints)."""

from __future__ import annotations

import fcntl
import socket
from pathlib import Path

import optuna
import pytest
from optuna.distributions import IntDistribution
from optuna.trial import TrialState, create_trial

from fm_optuna.cli import main
from fm_optuna.errors import ConfigError
from fm_optuna.study._sampler import DistinctSampler
from fm_optuna.study._spec import load_spec
from fm_optuna.study._tuner import PruningReporter, Tuner
from tests.conftest import ToyProblem

SPEC = """
[study]
name = "bad"
n_trials = {n_trials}
seed = 0
storage = "{storage}"
checkpoint_dir = "{root}/checkpoints"
pruner = "none"
{study_extra}
[problem]
benchmark = "examples.diabetes:build"
[training]
steps = 40
dt = 20
ranking = "given"
[search]
strategy = "random"
merge_trials = 2
[space]
dt = {{ low = 10, high = 20 }}
"""


def spec_file(tmp_path: Path, *, storage: str = "", n_trials: int = 1, extra: str = "") -> Path:
    path = tmp_path / "bad.toml"
    path.write_text(
        SPEC.format(
            root=tmp_path,
            storage=storage or f"sqlite:///{tmp_path}/optuna.db",
            n_trials=n_trials,
            study_extra=extra,
        )
    )
    return path


def run_cli(argv: list[str], capfd: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(argv)
    _, err = capfd.readouterr()
    assert "Traceback" not in err
    return code, err.strip().splitlines()[-1] if err.strip() else ""


# --- 6. the Optuna storage is checked before the MLflow store is created -------------------


@pytest.mark.parametrize("storage", ["corrupt", "sqlite://tracking/optuna.db"])
def test_a_broken_optuna_storage_creates_no_mlflow_store(
    storage: str, tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    if storage == "corrupt":
        (tmp_path / "optuna.db").write_bytes(b"not a database at all" * 10)
        url = f"sqlite:///{tmp_path}/optuna.db"
    else:
        url = storage
    spec = spec_file(tmp_path, storage=url)
    mlflow = tmp_path / "mlflow.db"
    code, line = run_cli(["tune", str(spec), "--tracking-uri", f"sqlite:///{mlflow}"], capfd)
    assert code == 2
    assert "Parameter `storage` should be a reachable Optuna storage URL" in line
    assert not mlflow.exists()


# --- 7. the problem check covers what broke later -------------------------------------------


class TensorMetrics(ToyProblem):
    def evaluate(self, model, split, tasks=None):  # type: ignore[no-untyped-def]
        import torch

        found = super().evaluate(model, split, tasks)
        return {task: {k: torch.tensor(v) for k, v in m.items()} for task, m in found.items()}


def test_evaluate_returning_tensors_is_refused_by_the_problem_check() -> None:
    from fm_optuna.problem._checks import check_problem

    with pytest.raises(ConfigError, match=r"plain numbers .* of type Tensor \(use \.item\(\)\)"):
        check_problem(TensorMetrics())


def test_a_factory_that_raises_its_own_error_is_one_line(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "raising.py").write_text(
        "def build(*, target=None, seed=0, device=None):\n"
        "    raise FileNotFoundError('no data in /data/x')\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    code, line = run_cli(["run", "--benchmark", "raising:build", "--no-tracking"], capfd)
    assert code == 2
    assert "Problem factory raising:build raised FileNotFoundError: no data in /data/x" in line


def test_a_missing_dependency_inside_a_user_module_is_named(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "needs.py").write_text("import not_installed_pkg_xyz\n\ndef build(**k): ...\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    code, line = run_cli(["run", "--benchmark", "needs:build", "--no-tracking"], capfd)
    assert code == 2
    assert "needs imports `not_installed_pkg_xyz`, which is not installed" in line
    assert "run from the folder" not in line


# --- 8. messages ----------------------------------------------------------------------------


def test_a_type_error_names_the_section_key_and_the_type(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    spec = spec_file(tmp_path)
    spec.write_text(
        spec.read_text().replace(
            'benchmark = "examples', 'batch_size = "32"\nbenchmark = "examples'
        )
    )
    code, line = run_cli(["tune", str(spec), "--no-tracking"], capfd)
    assert code == 2
    assert "Found `problem.batch_size = '32'` (a str)" in line
    spec = spec_file(tmp_path)
    spec.write_text(spec.read_text().replace("dt = 20\n", 'dt = "20"\n'))
    code, line = run_cli(["tune", str(spec), "--no-tracking"], capfd)
    assert code == 2 and "Found `training.dt = '20'` (a str)" in line


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--lr", "-1e-3", "Parameter `lr` should be a positive number. Found `lr = -0.001`."),
        ("--dt", "-5", "Parameter `dt` should be a positive integer. Found `dt = -5`."),
        ("--steps", "-.5", "invalid int value: '-.5'"),
    ],
)
def test_negative_numbers_reach_the_validator(
    flag: str,
    value: str,
    message: str,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) if "invalid int" in message else _nothing():
        code, line = run_cli(
            ["run", "--benchmark", "examples.diabetes:build", flag, value, "--no-tracking"], capfd
        )
        assert code == 2 and message in line
    if "invalid int" in message:
        assert message in capfd.readouterr().err
    assert "expected one argument" not in capfd.readouterr().err


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *args: object) -> None:
        return None


def test_an_empty_experiment_name_is_refused(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    code, line = run_cli(
        ["run", "--benchmark", "examples.diabetes:build", "--experiment", " "], capfd
    )
    assert (
        code == 2 and "Parameter `experiment` should be a non-empty MLflow experiment name" in line
    )
    assert list(tmp_path.iterdir()) == []


def test_tune_exits_1_when_every_trial_of_the_invocation_failed(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    spec = spec_file(tmp_path, n_trials=2)
    spec.write_text(spec.read_text().replace("[training]\n", "[training]\nlr = 1e6\n"))
    code, line = run_cli(["tune", str(spec), "--no-tracking"], capfd)
    assert code == 1
    assert line.startswith("fm-optuna tune: error: every trial of this invocation failed (2 of 2")


def test_a_study_of_many_trials_with_nothing_to_search_is_refused_by_both_doors(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import fm_optuna

    monkeypatch.chdir(tmp_path)
    spec = spec_file(tmp_path, n_trials=3)
    spec.write_text(spec.read_text().split("[space]")[0])
    code, line = run_cli(["tune", str(spec), "--no-tracking"], capfd)
    assert code == 2 and "Parameter `space` should give at least one of space.dt" in line
    assert "n_trials = 3" in line and list(tmp_path.iterdir()) == [spec]  # no store, no folder
    with pytest.raises(ConfigError, match=r"fm_optuna.tune\('api'\): Parameter `space`"):
        fm_optuna.tune(ToyProblem(), {}, study_name="api", n_trials=2, storage="sqlite:///x.db")
    assert list(tmp_path.iterdir()) == [spec]
    spec.write_text(spec.read_text().replace("n_trials = 3", "n_trials = 1"))
    assert run_cli(["tune", str(spec), "--no-tracking"], capfd)[0] == 0  # one trial: a run


# --- 9. the smaller ones --------------------------------------------------------------------


class _Event:
    def __init__(self, step: int) -> None:
        self.step, self.round = step, 1

        class Decision:
            score = -1.0

        self.decision = Decision()


def test_no_pruning_at_the_final_step() -> None:
    class AlwaysPrune:
        def __init__(self) -> None:
            self.reported: list[int] = []

        def report(self, value: float, step: int) -> None:
            self.reported.append(step)

        def should_prune(self) -> bool:
            return True

    trial = AlwaysPrune()
    reporter = PruningReporter(trial, total_steps=40)  # type: ignore[arg-type]
    reporter.on_merge_completed(_Event(40))  # type: ignore[arg-type]  # trained all T: kept
    assert trial.reported == [40]
    with pytest.raises(optuna.TrialPruned):
        reporter.on_merge_completed(_Event(20))  # type: ignore[arg-type]


def test_two_runs_never_share_one_checkpoint(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    checkpoint = tmp_path / "shared.ckpt"
    with open(tmp_path / "shared.ckpt.lock", "a+") as held:  # what a running `run` holds
        held.write("4242")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX)
        code, line = run_cli(
            [
                "run",
                "--benchmark",
                "examples.diabetes:build",
                "--methods",
                "forkmerge",
                "--no-tracking",
                "--checkpoint",
                str(checkpoint),
            ],
            capfd,
        )
    assert code == 2
    assert "a checkpoint no other run is writing (process 4242 is using it" in line
    assert not checkpoint.exists()


def test_finished_trials_checkpoints_are_removed_unless_kept(tmp_path: Path) -> None:
    removed = Tuner(load_spec(spec_file(tmp_path)), problem=ToyProblem()).run()
    folder = tmp_path / "checkpoints" / "bad"
    assert not list(folder.glob("trial_*.ckpt"))
    assert Path(removed.best_model).exists()  # the final model is kept
    kept = tmp_path / "kept"
    kept.mkdir()
    Tuner(load_spec(spec_file(kept, extra="keep_checkpoints = true")), problem=ToyProblem()).run()
    assert list((tmp_path / "kept" / "checkpoints" / "bad").glob("trial_0.ckpt"))


def test_distinct_sampler_does_not_block_a_failed_configuration() -> None:
    space = {"dt": IntDistribution(1, 2)}
    for seed in range(5):
        study = optuna.create_study(
            sampler=DistinctSampler(
                lambda s: optuna.samplers.RandomSampler(seed=s), seed=seed, space=space
            )
        )
        study.add_trial(create_trial(params={"dt": 1}, distributions=space, value=1.0))
        study.add_trial(create_trial(params={"dt": 2}, distributions=space, state=TrialState.FAIL))
        trial = study.ask(space)
        assert trial.params["dt"] == 2  # the failed one, not the complete one


def test_runs_left_running_by_a_failing_store_are_ended_by_the_next_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fm_optuna.tracking.store import PID_TAG, end_orphaned_runs, open_store

    monkeypatch.chdir(tmp_path)
    store = open_store(f"sqlite:///{tmp_path}/mlflow.db", experiment="orphans")
    # A run whose store failed mid-run: still RUNNING, owned by a process that is gone.
    run = store.client.create_run(
        store.experiment_id, tags={"fm_optuna.host": socket.gethostname(), PID_TAG: "999999"}
    )
    assert end_orphaned_runs(store) == 1
    assert store.client.get_run(run.info.run_id).info.status == "KILLED"
