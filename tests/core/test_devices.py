"""One device per branch (``device = "cuda:0,cuda:1"``), exercised on the CPU through the
seam: the run's problem and its replicas are distinct Problem instances, so every branch
trains on its own copy in its own thread, as on a node's GPUs. The run must be the one a
single device trains, bit for bit, dropout included."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from torch import nn

from fm_optuna.core import _branch_training, _loop
from fm_optuna.core._checkpoints import Checkpointer, load_checkpoint, save_checkpoint
from fm_optuna.core._devices import BranchDevices, check_device_kind, resolve_devices
from fm_optuna.core._events import EventStream
from fm_optuna.core._loop import ForkMergeConfig, ForkMergeResult, check_resumable, run_forkmerge
from fm_optuna.core._ranking import rank_auxiliaries
from fm_optuna.core._training import seeded_model
from fm_optuna.errors import ConfigError
from tests.conftest import ToyProblem
from tests.core.test_checkpoints import Crash, CrashAfterRound
from tests.core.test_parallel_branches import CONFIG, DropoutProblem, assert_same_run

#: Three rounds of the parallel-branches tests' setup (a resume after round 2 has one to go).
CONFIG = dataclasses.replace(CONFIG, total_steps=45)
PARALLEL = dataclasses.replace(CONFIG, parallel_branches=True)


class Recording(DropoutProblem):
    """Dropout problem that records which tasks each of its steps trained, and in which thread."""

    def __init__(self, **options: object) -> None:
        super().__init__(**options)  # type: ignore[arg-type]
        self.steps: list[tuple[str, ...]] = []
        self.threads: set[str] = set()  # names: unique in a process, unlike idents

    def task_losses(
        self, model: nn.Module, tasks: Sequence[str], generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        self.steps.append(tuple(tasks))
        self.threads.add(threading.current_thread().name)
        return super().task_losses(model, tasks, generator)


def on_copies(n: int, config: ForkMergeConfig = PARALLEL, **run: object) -> ForkMergeResult:
    """A run whose branches train on ``n`` copies of the problem (the first the run's own)."""
    first, *replicas = [DropoutProblem() for _ in range(n)]
    return run_forkmerge(first, config, replicas=replicas, **run)  # type: ignore[arg-type]


def test_several_copies_give_the_one_device_run_bit_for_bit_with_dropout() -> None:
    one_device = run_forkmerge(DropoutProblem(), CONFIG)
    for n in (2, 3):  # 3 branches: two on the first copy and one on the second, or one each
        assert_same_run(one_device, on_copies(n))


def test_branch_i_trains_on_copy_i_mod_n_in_a_thread_of_its_own() -> None:
    first, second = Recording(), Recording()
    result = run_forkmerge(first, PARALLEL, replicas=[second])
    weights = [branch.weights for branch in result.branches]
    trained = [tuple(task for task, w in weights[i].items() if w) for i in range(3)]
    assert set(first.steps) == {trained[0], trained[2]}
    assert set(second.steps) == {trained[1]}
    assert len(second.steps) == CONFIG.total_steps  # every step of branch 1, nothing else
    assert first.threads.isdisjoint(second.threads)
    assert threading.current_thread().name not in first.threads | second.threads


def test_several_copies_choose_the_device_trainer() -> None:
    cpu = torch.device("cpu")
    assert _loop.round_trainer(True, (cpu, cpu)) is _branch_training.train_on_devices
    assert _loop.round_trainer(False, (cpu, cpu)) is _branch_training.train_sequentially
    assert _loop.round_trainer(True, (cpu,)) is _branch_training.train_in_processes


def test_copies_trained_one_after_another_give_the_same_run() -> None:
    """Without parallel_branches (only the seam allows it) each branch still lives on its copy."""
    assert_same_run(run_forkmerge(DropoutProblem(), CONFIG), on_copies(2, CONFIG))


@pytest.mark.parametrize(
    "changes",
    [
        {"optimizer_policy": "average"},
        {"optimizer_policy": "reset"},
        {"plan": "joint", "keep": (0, 1, 4)},
        {"ranking": "prepass", "ranking_steps": 10},
        {"ranking": "merge", "ranking_steps": 10},
        {"final": "best"},
    ],
    ids=lambda changes: ",".join(f"{k}={v}" for k, v in changes.items()),
)
def test_policies_plans_and_rankings_on_copies_are_the_one_device_run(
    changes: dict[str, object],
) -> None:
    config = dataclasses.replace(CONFIG, **changes)  # type: ignore[arg-type]
    one_device = run_forkmerge(DropoutProblem(), config)
    several = on_copies(2, dataclasses.replace(config, parallel_branches=True))
    assert_same_run(one_device, several)
    assert several.ranking.order == one_device.ranking.order


def test_the_ranking_runs_spread_over_the_copies_and_score_on_the_first() -> None:
    first, second = Recording(), Recording()
    config = dataclasses.replace(PARALLEL, ranking="prepass", ranking_steps=10)
    initial = seeded_model(first, 0).state_dict()
    alone = rank_auxiliaries(DropoutProblem(), config, initial)
    spread = rank_auxiliaries(first, config, initial, replicas=[second])
    assert (spread.order, spread.relevance) == (alone.order, alone.relevance)
    assert len(second.steps) == 10  # the second of the three runs, nothing else


def test_a_non_finite_branch_on_a_replica_sits_out_as_on_one_device() -> None:
    def problem() -> ToyProblem:
        return ToyProblem(nan_task="t3", nan_after=0)

    config = dataclasses.replace(PARALLEL, branches=2)  # the second branch, on the replica, has t3
    one_device = run_forkmerge(problem(), dataclasses.replace(config, parallel_branches=False))
    several = run_forkmerge(problem(), config, replicas=[problem()])
    assert [d.fallback for d in several.decisions] == [d.fallback for d in one_device.decisions]
    assert all("went non-finite" in (d.fallback or "") for d in several.decisions)
    assert_same_run(one_device, several)


class _Broken(ToyProblem):
    def task_losses(
        self, model: nn.Module, tasks: Sequence[str], generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        raise ValueError("the replica's data loader broke")


def test_an_error_on_a_replica_is_raised_with_its_type_and_no_thread_is_left() -> None:
    before = threading.active_count()
    with pytest.raises(ValueError, match="the replica's data loader broke"):
        run_forkmerge(ToyProblem(), PARALLEL, replicas=[_Broken()])
    assert threading.active_count() == before


@pytest.mark.parametrize(("written", "resumed"), [(2, 1), (1, 2), (2, 3)])
def test_a_checkpoint_resumes_on_another_number_of_copies(
    tmp_path: Path, written: int, resumed: int
) -> None:
    """Branch states are device-free: a run checkpointed on n copies continues on m."""
    uninterrupted = on_copies(1, CONFIG)
    path = tmp_path / "checkpoint.pt"
    with pytest.raises(Crash):
        on_copies(written, events=EventStream([Checkpointer(path), CrashAfterRound(2)]))
    checkpoint = load_checkpoint(path)
    assert checkpoint is not None and checkpoint["devices"] == ["cpu"]
    resumed_run = on_copies(resumed, resume_from=checkpoint)
    assert resumed_run.resumed_from_round == 2
    assert_same_run(uninterrupted, resumed_run)


def test_a_checkpoint_of_another_kind_of_device_is_refused_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    with pytest.raises(Crash):
        run_forkmerge(
            DropoutProblem(), CONFIG, EventStream([Checkpointer(path), CrashAfterRound(1)])
        )
    checkpoint = load_checkpoint(path)
    assert checkpoint is not None
    checkpoint["devices"] = ["cuda:0", "cuda:1"]  # as a two-GPU run writes it
    save_checkpoint(checkpoint, path)
    expected = (
        "Parameter `device` should be cuda devices to resume this checkpoint (written on "
        "cuda:0,cuda:1: a data stream continues only on the kind of device that drew it). "
        "Found `device = cpu`."
    )
    with pytest.raises(ConfigError) as refused:
        check_resumable(CONFIG, checkpoint, [torch.device("cpu")])
    assert str(refused.value) == expected
    with pytest.raises(ConfigError, match="should be cuda devices to resume"):
        run_forkmerge(DropoutProblem(), CONFIG, resume_from=load_checkpoint(path))
    check_device_kind({"devices": ["cuda:1"]}, [torch.device("cuda", 0)])  # another list: fine
    check_device_kind({}, [torch.device("cpu")])  # written before devices were recorded


def test_a_replica_of_another_problem_is_refused_in_one_line() -> None:
    with pytest.raises(ConfigError, match=r"^Parameter `replicas` should be the problem toy"):
        BranchDevices(ToyProblem(), [ToyProblem(n_tasks=3)])


@pytest.fixture
def two_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """What torch reports on a node with two CUDA devices (nothing is run on them)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


def test_a_device_list_resolves_to_distinct_indexed_cuda_devices(two_gpus: None) -> None:
    cuda = [torch.device("cuda", 0), torch.device("cuda", 1)]
    assert resolve_devices("cuda:0,cuda:1", parallel=True) == tuple(cuda)
    assert resolve_devices(" cuda:1 , cuda ", parallel=True) == (cuda[1], cuda[0])
    assert resolve_devices("cuda:1", parallel=False) == (cuda[1],)
    assert resolve_devices(None, parallel=True) == (torch.device("cuda"),)
    assert resolve_devices("cpu", parallel=True) == (torch.device("cpu"),)


@pytest.mark.parametrize(
    ("value", "parallel", "allowed"),
    [
        ("cuda:0,cuda:1", False, "one device unless parallel_branches = true"),
        ("cuda:0,cuda:2", True, "CUDA devices among cuda:0 to cuda:1 (this machine has 2)"),
        ("cuda:2", False, "cpu or cuda:0 to cuda:1 (this machine has 2)"),
        ("cuda:0,cuda:0", True, "distinct CUDA devices (each one serves its branches)"),
        ("cuda,cuda:0", True, "distinct CUDA devices (each one serves its branches)"),
        ("cpu,cuda:1", True, "CUDA devices when it lists several"),
        ("cuda:0,", True, "a torch device (cpu, cuda or cuda:N), or with parallel_branches"),
        ("tpu:0", False, "a torch device (cpu, cuda or cuda:N), or with parallel_branches"),
    ],
)
def test_a_device_list_is_refused_in_one_line_naming_what_is_allowed(
    two_gpus: None, value: str, parallel: bool, allowed: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        resolve_devices(value, parallel=parallel)
    message = str(refused.value)
    assert message.startswith(f"Parameter `device` should be {allowed}")
    assert message.endswith(f"Found `device = {value}`.") and "\n" not in message


def test_run_resume_refuses_a_checkpoint_of_another_kind_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from fm_optuna import cli

    monkeypatch.chdir(tmp_path)
    path = tmp_path / "run.ckpt"
    run = ["run", "--benchmark", "examples.diabetes:build", "--no-tracking", "--json"]
    run += ["--methods", "forkmerge", "--steps", "4", "--dt", "2", "--checkpoint", str(path)]
    assert cli.main(run) == 0
    checkpoint = load_checkpoint(path)
    assert checkpoint is not None and checkpoint["devices"] == ["cpu"]
    save_checkpoint({**checkpoint, "devices": ["cuda:0"]}, path)
    capsys.readouterr()
    assert cli.main([*run, "--resume"]) == 2
    assert capsys.readouterr().err == (
        f"fm-optuna run: error: {path}: Parameter `device` should be cuda devices to resume this "
        "checkpoint (written on cuda:0: a data stream continues only on the kind of device that "
        "drew it). Found `device = cpu`.\n"
    )
