"""Every baseline on the one training loop, and the behaviours that could silently break."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torchjd.aggregation import PCGrad

from fm_optuna.baselines import (
    BASELINES,
    DynamicWeightAverage,
    GradientCosineSimilarity,
    PcGrad,
    PretrainFinetune,
    RandomLossWeighting,
    UncertaintyWeighting,
    make_baseline,
    run_baseline,
)
from fm_optuna.baselines._cosine_gate import CosineGate
from fm_optuna.config import ForkMergeConfig
from fm_optuna.core._training import (
    data_generator,
    make_optimizer,
    rule_parameters,
    seeded_model,
    train,
)
from fm_optuna.errors import ConfigError
from fm_optuna.problem._tasks import Problem
from tests.conftest import Parabolas, ToyProblem


def tiny(**overrides: object) -> ForkMergeConfig:
    values: dict[str, object] = {"dt": 5, "total_steps": 20, "lr": 1e-2, "seed": 0}
    values.update(overrides)
    return ForkMergeConfig(**values)  # type: ignore[arg-type]


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_every_baseline_lowers_the_target_loss_on_the_toy_problem(name: str) -> None:
    problem = ToyProblem()
    start = seeded_model(problem, 0)
    before = problem.evaluate(start, "val", ["t0"])["t0"]["mse"]
    result = run_baseline(make_baseline(name), problem, tiny())
    after = flat(result.model)
    assert torch.isfinite(after).all()
    assert not torch.equal(after, flat(start))
    assert problem.evaluate(result.model, "val", ["t0"])["t0"]["mse"] < before


@pytest.fixture(scope="module")
def digits() -> Problem:
    from fm_optuna.benchmarks import build_problem

    torch.set_num_threads(1)
    return build_problem("digits", target="uci", batch_size=8)


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_every_baseline_runs_on_digits(digits: Problem, name: str) -> None:
    config = ForkMergeConfig(dt=2, total_steps=4, seed=0)
    start = flat(seeded_model(digits, 0))
    after = flat(run_baseline(make_baseline(name), digits, config).model)
    assert torch.isfinite(after).all() and not torch.equal(after, start)


def test_unknown_baseline_and_bad_options_are_one_line_errors() -> None:
    with pytest.raises(ConfigError, match="Parameter `method` should be one of"):
        make_baseline("nope")
    with pytest.raises(ConfigError, match=r"Parameter `fraction` .* Found `fraction = 2`"):
        PretrainFinetune(fraction=2)
    with pytest.raises(ConfigError, match="Parameter `temperature`"):
        DynamicWeightAverage(temperature=0)


def test_uw_log_variances_are_optimised_with_the_model() -> None:
    result = run_baseline(UncertaintyWeighting(), ToyProblem(), tiny())
    rule, optimizer = result.rule, result.optimizer
    assert rule is not None and optimizer is not None
    (log_var,) = rule_parameters(rule)
    assert any(p is log_var for group in optimizer.param_groups for p in group["params"])
    assert set(rule.log_variances) == {"t0", "t1", "t2", "t3"}  # type: ignore[attr-defined]
    assert all(abs(v) > 1e-3 for v in rule.log_variances.values())  # type: ignore[attr-defined]


def test_ptft_fine_tunes_only_the_target_after_the_switch() -> None:
    problem = ToyProblem()
    config = tiny(total_steps=12)
    rule = PretrainFinetune().rule_for(problem, config)
    assert rule.switch_step == 6  # type: ignore[attr-defined]
    model = seeded_model(problem, 0)
    optimizer = make_optimizer(model, config)
    generator = data_generator(problem, 0, 0)
    reports: list[dict[str, float]] = []
    train(model, optimizer, problem, rule, steps=6, generator=generator, log_every=100)
    assert rule.tasks == problem.task_names
    pretrained = copy.deepcopy(model.state_dict())
    train(
        model,
        optimizer,
        problem,
        rule,
        steps=6,
        generator=generator,
        start_step=6,
        log_every=100,
        on_losses=lambda _, losses: reports.append(losses),
    )
    assert rule.tasks == ("t0",) and list(reports[0]) == ["t0"]
    state = model.state_dict()
    for name, value in state.items():
        unchanged = torch.equal(value, pretrained[name])
        if name.startswith("heads.") and not name.startswith("heads.t0."):
            assert unchanged, name  # auxiliary heads keep their pre-trained values
        elif name in ("heads.t0.weight", "trunk.0.weight"):
            assert not unchanged, name


def test_train_reports_each_task_over_the_steps_that_trained_it() -> None:
    problem = ToyProblem()
    model = seeded_model(problem, 0)
    rule = PretrainFinetune(pretrain_steps=2).rule(problem)
    reports: list[tuple[int, dict[str, float]]] = []
    train(
        model,
        make_optimizer(model, ForkMergeConfig()),
        problem,
        rule,
        steps=4,
        generator=data_generator(problem, 0, 0),
        log_every=4,
        on_losses=lambda step, losses: reports.append((step, losses)),
    )
    ((step, losses),) = reports
    assert step == 4 and set(losses) == set(problem.task_names)
    assert all(math.isfinite(v) for v in losses.values())


def test_gcs_drops_an_auxiliary_gradient_that_conflicts_with_the_target() -> None:
    problem = Parabolas({"target": 1.0, "against": -1.0, "along": 2.0})
    model = problem.make_model()
    rule = GradientCosineSimilarity().rule(problem)
    rule.backward(problem.task_losses(model, rule.tasks, torch.Generator()), model)
    # g_target = −2, g_against = +2 (cos −1: dropped), g_along = −4 (cos +1: kept).
    assert model.shared.grad is not None
    assert model.shared.grad.item() == pytest.approx(-6.0)
    matrix = torch.tensor([[1.0, 0.0], [-1.0, 0.1], [0.5, 1.0]])
    assert CosineGate()(matrix).tolist() == pytest.approx([1.5, 1.0])
    cosine = 0.5 / math.sqrt(1.25)  # of the kept row; the conflicting row's is negative
    weighted = CosineGate(weighted=True)(matrix)
    assert weighted.tolist() == pytest.approx([1.0 + 0.5 * cosine, cosine])


def test_rlw_weights_are_a_seeded_softmax_summing_to_one() -> None:
    problem = ToyProblem()

    def draws(seed: int) -> list[torch.Tensor]:
        rule = RandomLossWeighting().rule_for(problem, tiny(seed=seed))
        return [rule.draw() for _ in range(3)]  # type: ignore[attr-defined]

    first, again, other = draws(0), draws(0), draws(1)
    for weights in first + other:
        assert weights.sum().item() == pytest.approx(1.0) and (weights > 0).all()
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0], other[0])
    assert not torch.equal(first[0], first[1])  # a new draw every step


def test_dwa_weights_follow_the_formula_on_a_crafted_loss_history() -> None:
    problem = ToyProblem(n_tasks=2)
    rule = DynamicWeightAverage(temperature=2.0, window=2).rule(problem)
    history = {1: (2.0, 4.0), 2: (2.0, 4.0), 3: (1.0, 4.0), 4: (1.0, 4.0), 5: (3.0, 3.0)}
    weights = {}
    for step, values in history.items():
        rule.begin_step(step)  # type: ignore[attr-defined]
        leaves = [torch.tensor(v, requires_grad=True) for v in values]
        rule.backward(dict(zip(problem.task_names, leaves, strict=True)), nn.Module())
        weights[step] = [leaf.grad.item() for leaf in leaves]  # type: ignore[union-attr]
    assert weights[1] == weights[4] == [1.0, 1.0]  # the first two rounds: equal weights
    # Round 3: w = (1/2, 4/4), λ = K softmax(w / T).
    rates = torch.tensor([0.5, 1.0]) / 2.0
    assert weights[5] == pytest.approx((2 * torch.softmax(rates, 0)).tolist())


def test_pcgrad_gives_torchjds_aggregation_of_the_shared_jacobian() -> None:
    problem = ToyProblem(batch_norm=False)
    model = seeded_model(problem, 0)
    rule = PcGrad().rule(problem)
    generator = data_generator(problem, 0, 0)
    state = generator.get_state()
    torch.manual_seed(7)  # PCGrad draws its projection order from torch's global generator
    rule.backward(problem.task_losses(model, rule.tasks, generator), model)
    shared = problem.shared_parameters(model)
    assert [n for n, _ in model.named_parameters() if not n.startswith("heads.")] == [
        "trunk.0.weight",
        "trunk.0.bias",
    ]
    generator.set_state(state)
    losses = problem.task_losses(model, rule.tasks, generator)
    rows = [torch.autograd.grad(losses[t], shared, retain_graph=True) for t in rule.tasks]
    jacobian = torch.stack([torch.cat([g.reshape(-1) for g in row]) for row in rows])
    torch.manual_seed(7)
    expected = PCGrad()(jacobian)
    got = torch.cat([p.grad.reshape(-1) for p in shared])  # type: ignore[union-attr]
    assert torch.allclose(got, expected, atol=1e-6)
    # Heads get their own task's gradient.
    (head_grad,) = torch.autograd.grad(losses["t2"], [model.heads["t2"].weight])
    assert torch.allclose(model.heads["t2"].weight.grad, head_grad, atol=1e-6)  # type: ignore[arg-type]


def test_auto_lambda_learns_the_task_weights() -> None:
    problem = ToyProblem()
    result = run_baseline(make_baseline("autol"), problem, tiny())
    weights = result.rule.weights.detach()  # type: ignore[union-attr]
    assert torch.isfinite(weights).all()
    assert not torch.allclose(weights, torch.full_like(weights, 0.1))


def test_shared_parameters_default_to_everything_outside_the_heads() -> None:
    problem = ToyProblem()
    model = problem.make_model()
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in problem.shared_parameters(model)) == [
        "trunk.0.bias",
        "trunk.0.weight",
        "trunk.1.bias",
        "trunk.1.weight",
    ]


def test_the_registry_and_the_cli_load_torchjd_only_for_a_gradient_method() -> None:
    """Importing torchjd loads cvxpy (seconds at every CLI start); only building a gradient
    method's rule may import it."""
    import subprocess
    import sys

    probe = (
        "import sys\n"
        "import fm_optuna.cli, fm_optuna.cli._compare, fm_optuna.cli._run, fm_optuna.cli._study\n"
        "from fm_optuna.baselines import make_baseline\n"
        "[make_baseline(name) for name in ('stl', 'ew', 'pcgrad', 'gcs', 'itmtl', 'uw')]\n"
        "print('torchjd' in sys.modules, 'cvxpy' in sys.modules)\n"
    )
    found = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout.split()
    assert found == ["False", "False"]
