"""Resume after a merge reproduces the uninterrupted run: same Λ trajectory, same final model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fm_optuna.core._checkpoints import Checkpointer, load_checkpoint
from fm_optuna.core._events import EventStream, MergeCompleted, Observer
from fm_optuna.core._loop import ForkMergeConfig, run_forkmerge
from fm_optuna.errors import ConfigError
from tests.conftest import ToyProblem


class Crash(Exception):
    pass


class CrashAfterRound(Observer):
    def __init__(self, round_: int) -> None:
        self.round = round_

    def on_merge_completed(self, event: MergeCompleted) -> None:
        if event.round == self.round:
            raise Crash


CONFIG = ForkMergeConfig(
    dt=15,
    total_steps=75,
    strategy="tpe",
    merge_trials=6,
    branches=3,
    ranking_steps=10,
    optimizer_policy="keep",
    seed=5,
    log_every=5,
)


@pytest.mark.parametrize(
    ("policy", "hooks"),
    [
        ("keep", {}),
        ("average", {}),
        # A schedule is part of each branch's state: resumed runs follow the same curve.
        ("keep", {"scheduler": "cosine", "clip_grad_norm": 0.5}),
        ("reset", {"optimizer": "sgd", "momentum": 0.9, "lr": 0.05, "scheduler": "step"}),
        ("average", {"optimizer": "adamw", "weight_decay": 0.01, "scheduler": "cosine"}),
    ],
)
def test_resume_reproduces_the_uninterrupted_run(
    tmp_path: Path, policy: str, hooks: dict[str, object]
) -> None:
    config = ForkMergeConfig(
        **{**CONFIG.__dict__, "optimizer_policy": policy, "final": "best", **hooks}
    )
    uninterrupted = run_forkmerge(ToyProblem(), config)

    path = tmp_path / "run.ckpt"
    with pytest.raises(Crash):
        run_forkmerge(ToyProblem(), config, EventStream([Checkpointer(path), CrashAfterRound(2)]))
    checkpoint = load_checkpoint(path)
    assert checkpoint is not None and checkpoint["round"] == 2

    resumed = run_forkmerge(
        ToyProblem(), config, EventStream([Checkpointer(path)]), resume_from=checkpoint
    )
    assert resumed.lambda_history == uninterrupted.lambda_history
    assert resumed.steps == uninterrupted.steps == [15, 30, 45, 60, 75]
    assert resumed.final_round == uninterrupted.final_round
    for key, value in uninterrupted.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[key], value), key
    assert load_checkpoint(path)["round"] == 5


def test_resume_refuses_a_checkpoint_of_another_configuration(tmp_path: Path) -> None:
    path = tmp_path / "run.ckpt"
    run_forkmerge(
        ToyProblem(),
        ForkMergeConfig(**{**CONFIG.__dict__, "total_steps": 30}),
        EventStream([Checkpointer(path)]),
    )
    with pytest.raises(ConfigError, match=r"differs in .*dt"):
        run_forkmerge(
            ToyProblem(),
            ForkMergeConfig(**{**CONFIG.__dict__, "dt": 10}),
            resume_from=load_checkpoint(path),
        )


def test_no_checkpoint_yet_is_none(tmp_path: Path) -> None:
    assert load_checkpoint(tmp_path / "missing.ckpt") is None


def test_a_truncated_checkpoint_is_one_line_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "run.ckpt"
    with pytest.raises(Crash):
        run_forkmerge(ToyProblem(), CONFIG, EventStream([Checkpointer(path), CrashAfterRound(1)]))
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ConfigError) as error:
        load_checkpoint(path)
    message = str(error.value)
    assert f"Found `checkpoint = {path}`" in message and "a whole fm-optuna checkpoint" in message
    assert "\n" not in message
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="checkpoint"):
        load_checkpoint(path)
