"""The fork → train → merge loop on the toy problem: events, policies, determinism, final model."""

from __future__ import annotations

import math

import pytest
import torch

from fm_optuna.config import ForkMergeConfig
from fm_optuna.core._events import EventStream, MergeCompleted, Observer, TrainingProgress
from fm_optuna.core._loop import run_forkmerge
from fm_optuna.core._training import target_score
from fm_optuna.errors import ConfigError
from tests.conftest import ToyProblem


class Recorder(Observer):
    def __init__(self) -> None:
        self.events: list[object] = []

    def on_run_started(self, event) -> None:
        self.events.append(event)

    def on_training_progress(self, event) -> None:
        self.events.append(event)

    def on_branches_evaluated(self, event) -> None:
        self.events.append(event)

    def on_merge_completed(self, event) -> None:
        self.events.append(event)


def config(**overrides) -> ForkMergeConfig:
    values = dict(
        dt=20,
        total_steps=70,
        strategy="grid",
        grid_resolution=0.25,
        branches=3,
        ranking="prepass",
        ranking_steps=10,
        seed=3,
        log_every=10,
    )
    values.update(overrides)
    return ForkMergeConfig(**values)


def test_rounds_merges_and_events() -> None:
    recorder = Recorder()
    result = run_forkmerge(ToyProblem(), config(), EventStream([recorder]))
    assert [e.step for e in recorder.events if isinstance(e, MergeCompleted)] == [20, 40, 60, 70]
    assert result.steps == [20, 40, 60, 70]  # the last round is shortened to end at T
    assert len(result.branches) == 3 and result.ranking.method == "prepass"
    assert [b.tasks[0] for b in result.branches] == ["t0"] * 3
    for decision in result.decisions:
        assert math.isclose(sum(decision.weights), 1.0) and min(decision.weights) >= 0
    progress = [e for e in recorder.events if isinstance(e, TrainingProgress)]
    assert {e.branch for e in progress} == {b.name for b in result.branches}
    assert max(e.step for e in progress) == 70


def test_merge_is_never_worse_than_the_best_branch_and_final_is_last_merge() -> None:
    recorder = Recorder()
    problem = ToyProblem()
    result = run_forkmerge(problem, config(), EventStream([recorder]))
    merges = [e for e in recorder.events if isinstance(e, MergeCompleted)]
    for merge in merges:
        assert merge.gain >= -1e-9  # grid contains every vertex, i.e. each single branch
        assert merge.merged_metrics["mse"] == pytest.approx(-merge.decision.score)
    assert target_score(problem, result.model)[0] == pytest.approx(merges[-1].decision.score)


def test_same_seed_same_lambda_trajectory_and_different_seed_differs() -> None:
    first = run_forkmerge(ToyProblem(), config(strategy="tpe", merge_trials=6))
    second = run_forkmerge(ToyProblem(), config(strategy="tpe", merge_trials=6))
    other = run_forkmerge(ToyProblem(), config(strategy="tpe", merge_trials=6, seed=4))
    assert first.lambda_history == second.lambda_history
    assert first.lambda_history != other.lambda_history


@pytest.mark.parametrize("policy", ["keep", "reset", "average"])
def test_optimizer_policies(policy: str) -> None:
    result = run_forkmerge(ToyProblem(), config(optimizer_policy=policy, total_steps=40))
    assert len(result.decisions) == 2


def test_average_policy_averages_moments_with_lambda() -> None:
    from fm_optuna.core._loop import BranchRun, apply_optimizer_policy
    from fm_optuna.core._training import make_optimization

    runs = []
    for scale in (1.0, 3.0):
        model = torch.nn.Linear(2, 1)
        optimization = make_optimization(model, config(lr=0.1))
        model(torch.ones(1, 2) * scale).sum().backward()
        optimization.optimizer.step()
        runs.append(BranchRun(None, model, optimization, torch.Generator(), None))  # type: ignore[arg-type]
    expected = (
        0.25 * runs[0].optimizer.state[runs[0].model.weight]["exp_avg"]
        + 0.75 * runs[1].optimizer.state[runs[1].model.weight]["exp_avg"]
    )
    apply_optimizer_policy(runs, [0.25, 0.75], "average", config(lr=0.1))
    for run in runs:
        torch.testing.assert_close(run.optimizer.state[run.model.weight]["exp_avg"], expected)


def test_final_best_returns_the_best_validated_merge() -> None:
    recorder = Recorder()
    problem = ToyProblem()
    result = run_forkmerge(problem, config(final="best", lr=0.05), EventStream([recorder]))
    merges = [e for e in recorder.events if isinstance(e, MergeCompleted)]
    best = max(merges, key=lambda m: m.decision.score)
    assert result.final_round == best.round
    assert target_score(problem, result.model)[0] == pytest.approx(best.decision.score)


def test_given_ranking_uses_aux_order_and_skips_the_prepass() -> None:
    result = run_forkmerge(
        ToyProblem(), config(ranking="given", aux_order=("t3", "t1", "t2"), branches=4)
    )
    assert result.ranking.method == "given" and result.ranking.seconds < 0.5
    assert result.branches[1].tasks == ("t0", "t3")


def test_two_branches_need_no_ranking() -> None:
    result = run_forkmerge(ToyProblem(), config(branches=2))
    assert result.ranking.method == "not needed"
    assert [b.name for b in result.branches] == ["target", "all"]


@pytest.mark.parametrize(
    ("overrides", "parameter"),
    [
        ({"dt": 0}, "dt"),
        ({"dt": 100}, "dt"),
        ({"total_steps": 0}, "steps"),
        ({"strategy": "sgd"}, "strategy"),
        ({"optimizer_policy": "zero"}, "optimizer_policy"),
        ({"final": "first"}, "final"),
        ({"merge_trials": 0}, "merge_trials"),
        ({"plan": "tree"}, "plan"),
    ],
)
def test_bad_configuration_names_the_parameter(overrides: dict, parameter: str) -> None:
    with pytest.raises(ConfigError, match=f"Parameter `{parameter}`"):
        config(**overrides)


def test_affinity_ranking_is_selectable() -> None:
    result = run_forkmerge(ToyProblem(), config(ranking="affinity"))
    assert result.ranking.method == "affinity"
    assert sorted(result.ranking.order) == ["t1", "t2", "t3"]
    assert result.ranking.relevance is not None


def test_joint_plan_uses_the_pseudo_target_of_appendix_a4() -> None:
    from fm_optuna.problem._tasks import JOINT_TARGET, JointTarget

    problem = ToyProblem()
    joint = JointTarget(problem)
    model = joint.make_model()
    generator = torch.Generator().manual_seed(0)
    losses = joint.task_losses(model, [JOINT_TARGET, "t1"], generator)
    base = problem.task_losses(model, problem.task_names, torch.Generator().manual_seed(0))
    assert losses[JOINT_TARGET].item() == pytest.approx(sum(v.item() for v in base.values()) / 4)
    assert losses["t1"].item() == pytest.approx(base["t1"].item())
    metrics = joint.evaluate(model, "val")
    assert metrics[JOINT_TARGET]["score_sum"] == pytest.approx(
        -sum(metrics[t]["mse"] for t in problem.task_names)
    )

    result = run_forkmerge(problem, config(plan="joint", branches=3))
    assert result.branches[0].tasks == (JOINT_TARGET,)
    assert set(result.branches[-1].tasks) == {JOINT_TARGET, *problem.task_names}


class _WarmStarts(Observer):
    """Records the warm start each merge search was given (from the saved merge problem)."""

    def __init__(self) -> None:
        self.seen: list[object] = []

    def on_merge_completed(self, event: MergeCompleted) -> None:
        assert event.merge_problem is not None
        self.seen.append(event.merge_problem()["warm_start"])


@pytest.mark.parametrize("warm_start", [True, False])
def test_warm_start_starts_each_search_from_the_previous_lambda_only_when_on(
    warm_start: bool,
) -> None:
    config = ForkMergeConfig(dt=20, total_steps=60, merge_trials=6, warm_start=warm_start)
    seen = _WarmStarts()
    result = run_forkmerge(ToyProblem(), config, EventStream([seen]))
    previous = [None, *(tuple(d.weights) for d in result.decisions[:-1])]
    expected = previous if warm_start else [None] * len(previous)
    assert [None if w is None else tuple(w) for w in seen.seen] == expected
