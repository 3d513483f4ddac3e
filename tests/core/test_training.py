"""The training loop's hooks (optimizer, schedule, clipping, mixed precision) and its
non-finite-loss check, on the toy problem."""

from __future__ import annotations

import functools
import logging
import math

import pytest
import torch

from fm_optuna.baselines import make_baseline, run_baseline
from fm_optuna.config import ForkMergeConfig
from fm_optuna.core._events import BranchDiverged, EventStream, MergeCompleted, Observer
from fm_optuna.core._loop import run_forkmerge
from fm_optuna.core._training import (
    WeightedSum,
    data_generator,
    make_optimization,
    make_optimizer,
    seeded_model,
    train,
)
from fm_optuna.errors import ConfigError, FmOptunaError, NonFiniteTraining
from tests.conftest import ToyProblem


def tiny(**overrides: object) -> ForkMergeConfig:
    values: dict[str, object] = {
        "dt": 10,
        "total_steps": 30,
        "strategy": "grid",
        "grid_resolution": 0.25,
        "branches": 2,
        "ranking": "given",
        "log_every": 5,
    }
    values.update(overrides)
    return ForkMergeConfig(**values)  # type: ignore[arg-type]


class Recorder(Observer):
    def __init__(self) -> None:
        self.diverged: list[BranchDiverged] = []
        self.merges: list[MergeCompleted] = []

    def on_branch_diverged(self, event: BranchDiverged) -> None:
        self.diverged.append(event)

    def on_merge_completed(self, event: MergeCompleted) -> None:
        self.merges.append(event)


# --- non-finite losses ----------------------------------------------------------------------


def test_a_nan_loss_names_its_exact_step_and_task_at_the_next_report_point() -> None:
    problem = ToyProblem(nan_task="t1", nan_after=6)
    model = seeded_model(problem, 0)
    with pytest.raises(NonFiniteTraining) as caught:
        train(
            model,
            make_optimizer(model, tiny()),
            problem,
            WeightedSum({"t0": 1.0, "t1": 1.0}),
            steps=40,
            generator=data_generator(problem, 0, 0),
            start_step=100,
            log_every=25,  # checked at step 125: the 7th step (107) is still named
        )
    error = caught.value
    assert (error.task, error.step) == ("t1", 107) and math.isnan(error.value)
    assert problem.nan_calls == 25  # trained to the report point, not beyond
    assert isinstance(error, FmOptunaError)
    assert "task `t1` at step 107" in str(error) and "\n" not in str(error)


def test_a_branch_that_goes_non_finite_sits_out_the_merge_and_the_run_goes_on() -> None:
    # Two branches, target (t0) and all: only the second trains t1, which goes NaN at step 13.
    problem = ToyProblem(nan_task="t1", nan_after=12)
    recorder = Recorder()
    result = run_forkmerge(problem, tiny(), EventStream([recorder]))
    event, again = recorder.diverged
    assert (event.round, event.branch, event.step, event.task) == (2, "all", 13, "t1")
    assert (again.round, again.step) == (3, 21)  # restarted from θ*, the toy loss is still NaN
    first, second, third = (m.decision for m in recorder.merges)
    assert first.fallback is None
    assert second.weights == (1.0, 0.0) and "branch all went non-finite" in second.fallback
    assert all(t.weights[1] == 0.0 for t in second.trials)
    assert third.weights == (1.0, 0.0)
    assert all(math.isfinite(m.decision.score) for m in recorder.merges)
    assert all(torch.isfinite(v).all() for v in result.model.state_dict().values())


def test_when_every_branch_goes_non_finite_the_run_stops_with_one_clear_error() -> None:
    # The target is in every branch. Round 2: `target` trains t0's 21st-30th losses (NaN from
    # the 25th: its step 15), then `all` its 31st-40th (NaN from its step 11, the earliest).
    problem = ToyProblem(nan_task="t0", nan_after=24)
    with pytest.raises(NonFiniteTraining) as caught:
        run_forkmerge(problem, tiny())
    error = caught.value
    assert (error.run, error.branch, error.task, error.step) == ("forkmerge", "all", "t0", 11)
    assert "every branch of round 2 went non-finite" in str(error)


def test_a_baseline_that_goes_non_finite_names_the_method() -> None:
    with pytest.raises(NonFiniteTraining, match=r"task `t2` at step 4 of ew\b"):
        run_baseline(make_baseline("ew"), ToyProblem(nan_task="t2", nan_after=3), tiny())


# --- the configuration ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "parameter"),
    [
        ({"optimizer": "rmsprop"}, "optimizer"),
        ({"optimizer": 3}, "optimizer"),
        ({"scheduler": "linear"}, "scheduler"),
        ({"momentum": 0.9}, "momentum"),  # Adam has no momentum option
        ({"optimizer": "sgd", "momentum": 1.0}, "momentum"),
        ({"optimizer": "sgd", "momentum": math.nan}, "momentum"),
        ({"weight_decay": -1e-4}, "weight_decay"),
        ({"weight_decay": math.inf}, "weight_decay"),
        ({"lr": math.inf}, "lr"),
        ({"lr": math.nan}, "lr"),
        ({"lr_gamma": 0.0}, "lr_gamma"),
        ({"lr_step_size": 0}, "lr_step_size"),
        ({"clip_grad_norm": 0.0}, "clip_grad_norm"),
        ({"clip_grad_norm": math.inf}, "clip_grad_norm"),
        ({"grid_resolution": math.nan}, "grid_resolution"),
        ({"amp": "yes"}, "amp"),
        ({"optimizer": torch.optim.SGD, "weight_decay": 0.1}, "weight_decay"),
    ],
)
def test_bad_training_options_are_one_line_naming_the_parameter(
    overrides: dict[str, object], parameter: str
) -> None:
    with pytest.raises(ConfigError, match=rf"^Parameter `{parameter}` should be .*Found"):
        tiny(**overrides)


def test_optimizers_by_name_and_by_factory() -> None:
    model = torch.nn.Linear(3, 1)
    sgd = make_optimizer(model, tiny(optimizer="sgd", lr=0.5, momentum=0.9, weight_decay=1e-3))
    assert isinstance(sgd, torch.optim.SGD)
    assert sgd.param_groups[0]["momentum"] == 0.9 and sgd.param_groups[0]["weight_decay"] == 1e-3
    adamw = make_optimizer(model, tiny(optimizer="adamw", weight_decay=0.01))
    assert isinstance(adamw, torch.optim.AdamW) and adamw.param_groups[0]["weight_decay"] == 0.01
    assert type(make_optimizer(model, tiny())) is torch.optim.Adam
    factory = functools.partial(torch.optim.RMSprop, lr=0.01)
    config = tiny(optimizer=factory)
    assert isinstance(make_optimizer(model, config), torch.optim.RMSprop)
    assert config.as_params()["optimizer"] == "partial(torch.optim.rmsprop.RMSprop)"


def test_schedulers_step_once_per_optimizer_step_over_the_whole_budget() -> None:
    problem = ToyProblem()
    for scheduler, final_lr in (("cosine", 0.0), ("step", 0.1 * 0.5**3), ("none", 0.1)):
        config = tiny(lr=0.1, scheduler=scheduler, lr_step_size=10, lr_gamma=0.5)
        model = seeded_model(problem, 0)
        optimization = make_optimization(model, config)
        rule = WeightedSum({"t0": 1.0})
        generator = data_generator(problem, 0, 0)
        for start in (0, 10, 20):  # three Δt rounds of the same optimization
            train(
                model, optimization, problem, rule, steps=10, generator=generator, start_step=start
            )
        assert optimization.optimizer.param_groups[0]["lr"] == pytest.approx(final_lr, abs=1e-12)
    factory = functools.partial(torch.optim.lr_scheduler.LambdaLR, lr_lambda=lambda s: 1 / (1 + s))
    optimization = make_optimization(torch.nn.Linear(2, 1), tiny(scheduler=factory))
    assert isinstance(optimization.scheduler, torch.optim.lr_scheduler.LambdaLR)


def test_clip_grad_norm_bounds_every_step() -> None:
    problem = ToyProblem()
    config = tiny(optimizer="sgd", lr=1.0, clip_grad_norm=1e-3)
    model = seeded_model(problem, 0)
    before = torch.cat([p.detach().flatten() for p in model.parameters()])
    optimization = make_optimization(model, config)
    rule = WeightedSum({"t0": 1.0, "t1": 1.0})
    train(model, optimization, problem, rule, steps=1, generator=data_generator(problem, 0, 0))
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert float((after - before).norm()) == pytest.approx(1e-3, rel=1e-4)  # lr · clipped norm


def test_amp_is_ignored_with_a_note_on_cpu(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        optimization = make_optimization(torch.nn.Linear(2, 1), tiny(amp=True))
    assert optimization.scaler is None
    from fm_optuna.core._training import _note_amp_ignored

    if _note_amp_ignored.cache_info().hits == 0:  # noted once per process
        assert "amp = true is ignored on cpu" in caplog.text


# --- the hooks inside ForkMerge -------------------------------------------------------------


@pytest.mark.parametrize("policy", ["keep", "reset", "average"])
@pytest.mark.parametrize(
    "optimizer",
    [{"optimizer": "sgd", "momentum": 0.9}, {"optimizer": "sgd"}, {"optimizer": "adamw"}],
)
def test_every_optimizer_policy_works_with_every_optimizer(
    policy: str, optimizer: dict[str, object]
) -> None:
    config = tiny(optimizer_policy=policy, scheduler="cosine", lr=0.05, **optimizer)
    result = run_forkmerge(ToyProblem(), config)
    assert len(result.decisions) == 3
    assert all(math.isfinite(d.score) for d in result.decisions)


def test_average_policy_averages_sgd_momentum_buffers_with_lambda() -> None:
    from fm_optuna.core._loop import BranchRun, apply_optimizer_policy

    config = tiny(optimizer="sgd", momentum=0.9, lr=0.1)
    runs = []
    for scale in (1.0, 3.0):
        model = torch.nn.Linear(2, 1)
        optimization = make_optimization(model, config)
        model(torch.ones(1, 2) * scale).sum().backward()
        optimization.optimizer.step()
        runs.append(BranchRun(None, model, optimization, torch.Generator(), None))  # type: ignore[arg-type]
    buffers = [r.optimizer.state[r.model.weight]["momentum_buffer"] for r in runs]
    expected = 0.25 * buffers[0] + 0.75 * buffers[1]
    apply_optimizer_policy(runs, [0.25, 0.75], "average", config)
    for run in runs:
        torch.testing.assert_close(
            run.optimizer.state[run.model.weight]["momentum_buffer"], expected
        )


def test_each_branch_keeps_its_schedule_across_merges_and_resets() -> None:
    for policy in ("keep", "reset"):
        recorder = Recorder()
        config = tiny(optimizer_policy=policy, scheduler="step", lr=0.1, lr_step_size=10)
        run_forkmerge(ToyProblem(), config, EventStream([recorder]))
        assert len(recorder.merges) == 3
        # The schedule went on over the whole T in every branch: 3 decays of 10 steps each.
        snapshot = recorder.merges[-1].snapshot
        assert snapshot is not None
        for branch in snapshot()["branches"]:
            assert branch["scheduler"]["last_epoch"] == 30
            assert branch["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-4)


def test_callable_optimizer_and_scheduler_run_through_forkmerge_and_its_checkpoints() -> None:
    """The API's way in: any ``params -> Optimizer`` and ``optimizer -> LRScheduler``."""
    from fm_optuna.core._checkpoints import Checkpointer

    class Snapshots(Checkpointer):
        def __init__(self) -> None:
            self.states: list[dict[str, object]] = []

        def on_merge_completed(self, event: MergeCompleted) -> None:
            assert event.snapshot is not None
            self.states.append(event.snapshot())

    config = tiny(
        optimizer=functools.partial(torch.optim.RMSprop, lr=0.01),
        scheduler=functools.partial(torch.optim.lr_scheduler.ExponentialLR, gamma=0.9),
        optimizer_policy="reset",
        clip_grad_norm=1.0,
    )
    snapshots = Snapshots()
    result = run_forkmerge(ToyProblem(), config, EventStream([snapshots]))
    assert all(math.isfinite(d.score) for d in result.decisions)
    last = snapshots.states[-1]
    assert last["config"]["scheduler"] == "partial(torch.optim.lr_scheduler.ExponentialLR)"
    for branch in last["branches"]:  # type: ignore[union-attr]
        # Reset at every merge, yet the schedule went on over all 30 steps.
        assert branch["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.01 * 0.9**30)
