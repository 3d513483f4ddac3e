"""The folder benchmarks (DomainNet, NYUv2) with background decoding and local weights.

Decoding ahead in worker threads must not change a single bit: the batches, the losses, the
evaluation and a ForkMerge run interrupted and resumed from its checkpoint are those of inline
decoding (``workers = 0``). A ``weights`` file ends up in the model's trunk, and a wrong one is
one line naming ``weights`` before anything trains. Tiny fixtures (32 px) keep it fast.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch
from torch import nn

from fm_optuna.benchmarks import build_problem
from fm_optuna.cli import main
from fm_optuna.core._checkpoints import Checkpointer, load_checkpoint
from fm_optuna.core._events import EventStream, MergeCompleted, Observer
from fm_optuna.core._loop import ForkMergeConfig, run_forkmerge
from fm_optuna.errors import ConfigError
from fm_optuna.problem._tasks import Problem
from tests.datasets.test_datasets import write_domainnet, write_nyuv2

TWO = ("clipart", "sketch")


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("folders")
    write_domainnet(root / "domainnet", TWO)
    write_nyuv2(root / "nyuv2", {"train": 6, "val": 3})
    return {"domainnet": root / "domainnet", "nyuv2": root / "nyuv2"}


def build(name: str, folders: dict[str, Path], **options: object) -> Problem:
    small: dict[str, object] = {
        "domainnet": {"domains": ",".join(TWO), "image_size": 32, "batch_size": 3},
        # Resized (by the workers, on the CPU) and scale-cropped: both paths that draw or decode.
        "nyuv2": {"val_size": 2, "batch_size": 3, "image_size": [32, 40], "augment": True},
    }[name]
    values = {"data_dir": str(folders[name]), **small, **options}
    return build_problem(name, **values)  # type: ignore[arg-type]


def seeded(problem: Problem) -> nn.Module:
    torch.manual_seed(0)
    return problem.make_model().to(problem.device)


def pipeline_of(problem: Problem) -> object:
    return problem._pipeline  # type: ignore[attr-defined]


# --------------------------------------------------------------------------------------------
# Decoding ahead gives the inline batches
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["domainnet", "nyuv2"])
def test_workers_give_the_inline_losses_bit_for_bit(name: str, folders: dict[str, Path]) -> None:
    inline, ahead = build(name, folders, workers=0), build(name, folders, workers=2, prefetch=3)
    model = seeded(inline)
    tasks = list(inline.task_names)
    # A task list that changes makes the workers' guesses wrong: those steps must still match.
    schedule = [tasks, tasks, tasks, tasks[:1], tasks[:1], tasks, tasks]
    generators = [torch.Generator().manual_seed(7) for _ in range(2)]
    for step, wanted in enumerate(schedule):
        first = inline.task_losses(model, wanted, generators[0])
        second = ahead.task_losses(model, wanted, generators[1])
        assert first.keys() == second.keys()
        for task in wanted:
            assert torch.equal(first[task], second[task]), (step, task)
        assert torch.equal(generators[0].get_state(), generators[1].get_state()), step
    pipeline = pipeline_of(ahead)
    assert pipeline.hits > 0 and pipeline.misses > 0  # type: ignore[attr-defined]
    assert pipeline_of(inline).hits == 0  # type: ignore[attr-defined]
    for split in ("val", "test"):
        assert inline.evaluate(model, split) == ahead.evaluate(model, split)


@pytest.mark.parametrize("name", ["domainnet", "nyuv2"])
def test_workers_and_prefetch_are_checked(name: str, folders: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match=r"Parameter `workers` should be a non-negative"):
        build(name, folders, workers=-1)
    with pytest.raises(ConfigError, match=r"Found `problem.prefetch = 1.5` \(a float\)"):
        build(name, folders, prefetch=1.5)
    described = build(name, folders, workers=3, prefetch=1).describe()
    assert (described["workers"], described["prefetch"], described["weights"]) == (3, 1, "none")


class Crash(Exception):
    pass


class CrashAfterRound(Observer):
    def __init__(self, round_: int) -> None:
        self.round = round_

    def on_merge_completed(self, event: MergeCompleted) -> None:
        if event.round == self.round:
            raise Crash


@pytest.mark.parametrize("name", ["domainnet", "nyuv2"])
def test_a_run_with_workers_resumed_from_its_checkpoint_is_the_inline_run(
    name: str, folders: dict[str, Path], tmp_path: Path
) -> None:
    config = ForkMergeConfig(
        total_steps=6,
        dt=2,
        branches=2,
        strategy="grid",
        grid_resolution=0.5,
        ranking="given",
        seed=3,
        log_every=2,
    )
    uninterrupted = run_forkmerge(build(name, folders, workers=0), config)

    problem = build(name, folders, workers=2, prefetch=2)
    path = tmp_path / "run.ckpt"
    with pytest.raises(Crash):
        run_forkmerge(problem, config, EventStream([Checkpointer(path), CrashAfterRound(1)]))
    checkpoint = load_checkpoint(path)
    assert checkpoint is not None and checkpoint["round"] == 1
    # The same problem goes on: the crashed run's guesses (its branches' next batches) are still
    # decoding or waiting; the resumed run's generators, restored from the checkpoint, must get
    # exactly their own batches whether a guess is used or not.
    resumed = run_forkmerge(problem, config, resume_from=checkpoint)
    assert pipeline_of(problem).hits > 0  # type: ignore[attr-defined]

    assert resumed.lambda_history == uninterrupted.lambda_history
    assert resumed.steps == uninterrupted.steps == [2, 4, 6]
    for key, value in uninterrupted.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[key], value), key
    assert resumed.summary.test == uninterrupted.summary.test


@pytest.mark.parametrize("name", ["domainnet", "nyuv2"])
def test_parallel_branches_with_workers_are_the_inline_sequential_run(
    name: str, folders: dict[str, Path]
) -> None:
    """Each round forks a process per branch after the parent's decoding threads ran (the
    evaluations): a child starts threads of its own and gets the same batches."""
    config = ForkMergeConfig(
        total_steps=6, dt=2, branches=2, strategy="grid", grid_resolution=0.5, ranking="given"
    )
    sequential = run_forkmerge(build(name, folders, workers=0), config)
    parallel = run_forkmerge(
        build(name, folders, workers=2, prefetch=2),
        dataclasses.replace(config, parallel_branches=True),
    )
    assert parallel.lambda_history == sequential.lambda_history
    for key, value in sequential.model.state_dict().items():
        assert torch.equal(parallel.model.state_dict()[key], value), key


# --------------------------------------------------------------------------------------------
# Local pretrained weights
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet18_state() -> dict[str, torch.Tensor]:
    """What ``torchvision.models.resnet18().state_dict()`` saves, with recognisable values."""
    from torchvision.models import resnet18

    torch.manual_seed(123)
    return resnet18(weights=None).state_dict()


def saved(state: dict[str, torch.Tensor], path: Path) -> str:
    torch.save(state, path)
    return str(path)


def test_domainnet_loads_a_torchvision_state_dict_into_its_trunk(
    folders: dict[str, Path], resnet18_state: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    weights = saved(resnet18_state, tmp_path / "resnet18.pt")
    problem = build("domainnet", folders, weights=weights)
    assert problem.describe()["weights"] == weights
    model = seeded(problem)
    trunk = model.trunk.state_dict()  # type: ignore[union-attr]
    assert set(trunk) == {key for key in resnet18_state if not key.startswith("fc.")}
    for key, value in trunk.items():
        assert torch.equal(value, resnet18_state[key]), key
    # The heads stay the seed's: the same as without weights.
    plain = seeded(build("domainnet", folders)).state_dict()
    for key, value in model.state_dict().items():
        if key.startswith("heads."):
            assert torch.equal(value, plain[key]), key
    assert not torch.equal(trunk["conv1.weight"], plain["trunk.conv1.weight"])
    # The model's own state dict (trunk.* and heads.*) is accepted too; heads are not loaded.
    again = saved(model.state_dict(), tmp_path / "model.pt")
    reloaded = seeded(build("domainnet", folders, weights=again)).state_dict()
    assert torch.equal(
        reloaded["trunk.layer4.1.bn2.running_var"], trunk["layer4.1.bn2.running_var"]
    )


def test_nyuv2_loads_conv1_to_layer3_and_ignores_layer4(
    folders: dict[str, Path], resnet18_state: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    weights = saved(resnet18_state, tmp_path / "resnet18.pt")
    model = seeded(build("nyuv2", folders, weights=weights))
    trunk = model.trunk  # type: ignore[union-attr]
    pairs = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3"}
    loaded = trunk.state_dict()
    assert {key.split(".")[0] for key in loaded} == set(pairs)
    for key, value in loaded.items():
        index, _, rest = key.partition(".")
        assert torch.equal(value, resnet18_state[f"{pairs[index]}.{rest}"]), key


def one_line(error: pytest.ExceptionInfo[ConfigError]) -> str:
    message = str(error.value)
    assert "\n" not in message and message.startswith("Parameter `weights` should be")
    return message


@pytest.mark.parametrize("name", ["domainnet", "nyuv2"])
def test_wrong_weights_are_one_line_naming_the_key(
    name: str,
    folders: dict[str, Path],
    resnet18_state: dict[str, torch.Tensor],
    tmp_path: Path,
) -> None:
    missing = tmp_path / "nowhere.pt"
    with pytest.raises(ConfigError) as error:
        build(name, folders, weights=str(missing))
    assert f"Found `weights = {missing}` (no such file)" in one_line(error)

    wrong = dict(resnet18_state)
    wrong["layer1.0.conv1.weight"] = torch.zeros(32, 64, 3, 3)
    with pytest.raises(ConfigError) as error:
        build(name, folders, weights=saved(wrong, tmp_path / "wrong.pt"))
    assert "`layer1.0.conv1.weight` has shape [32, 64, 3, 3]" in one_line(error)
    assert "[64, 64, 3, 3]" in str(error.value)

    extra = {**resnet18_state, "layer9.weight": torch.zeros(1)}
    with pytest.raises(ConfigError) as error:
        build(name, folders, weights=saved(extra, tmp_path / "extra.pt"))
    assert "unexpected key `layer9.weight`" in one_line(error)

    short = {k: v for k, v in resnet18_state.items() if k != "layer2.0.conv1.weight"}
    with pytest.raises(ConfigError) as error:
        build(name, folders, weights=saved(short, tmp_path / "short.pt"))
    assert "no `layer2.0.conv1.weight`" in one_line(error)

    text = tmp_path / "notes.txt"
    text.write_text("not a state dict\n")
    with pytest.raises(ConfigError) as error:
        build(name, folders, weights=str(text))
    assert "torch.load could not read it" in one_line(error)


def test_counters_may_be_absent_and_a_checkpoint_may_wrap_the_state(
    folders: dict[str, Path], resnet18_state: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    old = {k: v for k, v in resnet18_state.items() if not k.endswith("num_batches_tracked")}
    wrapped = saved({"model": old, "epoch": torch.tensor(90)}, tmp_path / "checkpoint.pt")
    model = seeded(build("domainnet", folders, weights=wrapped))
    assert torch.equal(model.trunk.conv1.weight, resnet18_state["conv1.weight"])  # type: ignore[union-attr]


def test_cli_refuses_a_wrong_weights_file_in_one_line(
    folders: dict[str, Path],
    resnet18_state: dict[str, torch.Tensor],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    wrong = copy.copy(resnet18_state)
    wrong["conv1.weight"] = torch.zeros(64, 1, 7, 7)
    weights = saved(wrong, tmp_path / "wrong.pt")
    code = main(
        [
            "run",
            "--benchmark",
            "domainnet",
            "--data-dir",
            str(folders["domainnet"]),
            "--option",
            "image_size=32",
            "--option",
            "domains=clipart,sketch",
            "--option",
            f"weights={weights!r}",
            "--steps",
            "2",
            "--dt",
            "1",
            "--no-tracking",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "Parameter `weights`" in err and "`conv1.weight` has shape [64, 1, 7, 7]" in err


def test_workers_and_prefetch_leave_a_study_fingerprint_alone(tmp_path: Path) -> None:
    from fm_optuna.study._fingerprint import configuration_record
    from fm_optuna.study._spec import load_spec

    def record(problem_keys: str) -> dict[str, object]:
        path = tmp_path / "dn.toml"
        path.write_text(
            '[study]\nname = "dn"\n[problem]\nbenchmark = "domainnet"\ntarget = "clipart"\n'
            f'data_dir = "data/domainnet"\n{problem_keys}\n'
        )
        return configuration_record(load_spec(path))

    plain = record("image_size = 32")
    assert record("image_size = 32\nworkers = 8\nprefetch = 4") == plain
    assert record("image_size = 32\nweights = 'resnet18.pt'") != plain  # weights do train
