"""IT-MTL (Fifty et al., Algorithm 1 and Section 4.1): the choice, the scores and what is logged."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fm_optuna.baselines import (
    IncreasedTransfer,
    IncreasedTransferFirstOrder,
    IncreasedTransferUwPcGrad,
    make_baseline,
    run_baseline,
)
from fm_optuna.baselines.itmtl import TransferenceRule, candidate_names
from fm_optuna.config import ForkMergeConfig
from fm_optuna.core._events import EventStream, Observer, TrainingProgress
from fm_optuna.core._training import data_generator, rule_parameters, seeded_model
from fm_optuna.errors import ConfigError
from fm_optuna.problem._tasks import Problem
from tests.conftest import Parabolas, ToyProblem


def _one_sgd_step(centres: dict[str, float], *, first_order: bool = False) -> tuple[float, dict]:
    """θ after one IT-MTL step with SGD at η = 0.1 from θ = 0, and the rule's scores."""
    problem = Parabolas(centres)
    config = ForkMergeConfig(dt=1, total_steps=1, lr=0.1, optimizer="sgd", momentum=0.0, seed=0)
    result = run_baseline(IncreasedTransfer(first_order=first_order), problem, config)
    rule = result.rule
    assert isinstance(rule, TransferenceRule)
    return float(result.model.shared.detach()), rule.last_scores


# g_a = −2c_a, g_b = −2c_b at θ = 0; a lookahead θ' = −η g_φ; Z_φ = Σ_j 1 − (θ' − c_j)² / c_j².
@pytest.mark.parametrize(
    ("centres", "winner", "scores"),
    [
        # c = (1, −½): the small, opposed task b makes the most relative progress alone.
        ({"a": 1.0, "b": -0.5}, "b", {"ew": -0.25, "a": -0.6, "b": 0.15}),
        # c = (1, 1.5): both gradients agree and the sum goes furthest for both.
        ({"a": 1.0, "b": 1.5}, "ew", {"ew": 0.75 + 1.25 / 2.25, "a": 0.36 + 0.56 / 2.25}),
    ],
)
def test_the_candidate_with_the_highest_eq2_transference_is_applied(
    centres: dict[str, float], winner: str, scores: dict[str, float]
) -> None:
    theta, got = _one_sgd_step(centres)
    assert list(got) == ["ew", "a", "b"]
    for name, value in scores.items():
        assert got[name] == pytest.approx(value, abs=1e-5)
    assert max(got, key=lambda name: got[name]) == winner
    gradient = {"ew": -2 * sum(centres.values()), "a": -2 * centres["a"], "b": -2 * centres["b"]}
    assert theta == pytest.approx(-0.1 * gradient[winner])  # SGD applied g_winner
    # The first-order score picks the same candidate in these two cases.
    theta_fo, _ = _one_sgd_step(centres, first_order=True)
    assert theta_fo == pytest.approx(theta)


def _scores(problem: Problem, model: nn.Module, rule: TransferenceRule) -> dict[str, float]:
    """One backward of ``rule`` on a fixed batch of ``model`` (a copy), with the batch's replay."""
    model = copy.deepcopy(model)
    state = data_generator(problem, 0, 0).get_state()

    def draw(m: nn.Module) -> dict[str, torch.Tensor]:
        generator = torch.Generator()
        generator.set_state(state)
        return problem.task_losses(m, rule.tasks, generator)

    rule.replay_batches(draw)
    torch.manual_seed(3)  # PCGrad's projection order
    rule.backward(draw(model), model)
    return rule.last_scores


@pytest.mark.parametrize("lookahead", ["sgd", "optimizer"])
def test_the_first_order_score_ranks_candidates_as_the_exact_one_for_a_small_step(
    lookahead: str,
) -> None:
    problem = ToyProblem()
    model = seeded_model(problem, 0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-5)
    candidates = ("ew", "pcgrad", "tasks")
    scores = {}
    for first_order in (False, True):
        rule = TransferenceRule(
            problem,
            candidates,
            first_order=first_order,
            lookahead=lookahead,
            weighting="equal",
            lr=1e-5,
        )
        rule.bind_optimizer(optimizer)
        scores[first_order] = _scores(problem, model, rule)
    exact, approx = scores[False], scores[True]
    assert len(set(exact.values())) == len(exact) == 6  # no ties: the order means something
    assert sorted(exact, key=exact.__getitem__) == sorted(approx, key=approx.__getitem__)
    # Up to the heads' own step, the same for every candidate (the first-order score leaves it
    # out), the exact score is the first-order one plus O(η²).
    offsets = [exact[name] - approx[name] for name in exact]
    spread = max(approx.values()) - min(approx.values())
    assert max(offsets) - min(offsets) < 0.05 * spread


def test_which_candidate_won_is_reported_per_window() -> None:
    class Windows(Observer):
        def __init__(self) -> None:
            self.metrics: list[dict[str, float]] = []

        def on_training_progress(self, event: TrainingProgress) -> None:
            self.metrics.append(dict(event.metrics))

    windows = Windows()
    config = ForkMergeConfig(dt=5, total_steps=10, lr=1e-2, seed=0, log_every=5)
    result = run_baseline(
        make_baseline("itmtl"), ToyProblem(n_tasks=2), config, EventStream([windows])
    )
    names = ("ew", "t0", "t1")
    assert len(windows.metrics) == 2
    for metrics in windows.metrics:
        assert set(metrics) == {
            f"candidate/{n}/{k}" for n in names for k in ("chosen", "transference")
        }
        assert sum(metrics[f"candidate/{n}/chosen"] for n in names) == pytest.approx(1.0)
    rule = result.rule
    assert isinstance(rule, TransferenceRule) and sum(rule.wins.values()) == 10
    shares = [sum(m[f"candidate/{n}/chosen"] for m in windows.metrics) * 5 for n in names]
    assert shares == pytest.approx([rule.wins[n] for n in names])


def test_the_presets_and_the_uw_weighted_variant() -> None:
    assert IncreasedTransferFirstOrder().first_order and not IncreasedTransfer().first_order
    assert make_baseline("it-pcgrad").candidates == ("ew", "pcgrad")  # type: ignore[attr-defined]
    result = run_baseline(
        IncreasedTransferUwPcGrad(), ToyProblem(), ForkMergeConfig(dt=5, total_steps=10, lr=1e-2)
    )
    assert result.rule is not None and result.optimizer is not None
    (log_var,) = rule_parameters(result.rule)
    assert any(p is log_var for group in result.optimizer.param_groups for p in group["params"])
    assert (log_var.detach().abs() > 1e-4).all()  # learnt, as in ``uw``


def test_candidates_are_checked_with_one_line_errors() -> None:
    assert candidate_names(["tasks", "ew", "t1"], ["t0", "t1"]) == ("t0", "t1", "ew")
    assert candidate_names(["mean", "pcgrad"], ["t0", "t1"]) == ("mean", "pcgrad")
    with pytest.raises(ConfigError, match="Parameter `candidates` should be one of"):
        IncreasedTransfer(candidates=("ew", "nope")).rule(ToyProblem())
    with pytest.raises(ConfigError, match="Parameter `lookahead`"):
        IncreasedTransfer(lookahead="newton")
    with pytest.raises(ConfigError, match="Parameter `candidates`"):
        IncreasedTransfer(candidates=())
    assert IncreasedTransfer(candidates=["ew", "pcgrad"]).candidates == ("ew", "pcgrad")  # type: ignore[arg-type]


def test_make_baseline_takes_checked_options() -> None:
    chosen = make_baseline("itmtl", {"candidates": ["ew", "pcgrad"], "first_order": True})
    assert chosen == IncreasedTransfer(candidates=("ew", "pcgrad"), first_order=True)
    with pytest.raises(ConfigError, match=r"Parameter `itmtl.alpha` should be one of candidates"):
        make_baseline("itmtl", {"alpha": 1.0})
    with pytest.raises(ConfigError, match="ew takes no options"):
        make_baseline("ew", {"alpha": 1.0})
