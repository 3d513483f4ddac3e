"""DistinctSampler: seeded per trial number, never another trial's configuration, delegating.

The wrapped samplers here are either Optuna's (random, TPE as the tuner builds it) or
``Scripted``, which proposes a fixed list of points so that each rule can be seen on its own.
Studies are in memory.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.samplers import BaseSampler, RandomSampler, TPESampler
from optuna.trial import FrozenTrial, TrialState, create_trial

from fm_optuna.study._sampler import ATTEMPTS, ENUMERABLE, DistinctSampler, trial_seed

ROOT = Path(__file__).resolve().parents[2]
LETTERS: dict[str, BaseDistribution] = {"x": CategoricalDistribution(["a", "b", "c"])}
GRID: dict[str, BaseDistribution] = {
    "x": CategoricalDistribution(["a", "b", "c"]),
    "n": IntDistribution(0, 2),
}
CONTINUOUS: dict[str, BaseDistribution] = {
    "lr": FloatDistribution(1e-4, 1e-1, log=True),
    "width": FloatDistribution(0.0, 1.0),
}


@pytest.fixture(autouse=True)
def quiet_optuna() -> Iterator[None]:
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    yield
    optuna.logging.set_verbosity(verbosity)


class Scripted(BaseSampler):
    """Proposes ``script[0]``, then ``script[1]``, ... (the last point forever), one parameter
    at a time through ``sample_independent``; logs every call into ``log``."""

    def __init__(self, seed: int, script: Sequence[Mapping[str, Any]], log: list[tuple]) -> None:
        self.seed, self.script, self.log = seed, script, log
        self.drawn: dict[str, int] = {}
        log.append(("make", seed))

    def infer_relative_search_space(
        self, study: optuna.Study, trial: FrozenTrial
    ) -> dict[str, BaseDistribution]:
        return {}

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        return {}

    def sample_independent(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        param_name: str,
        param_distribution: BaseDistribution,
    ) -> Any:
        count = self.drawn.get(param_name, 0)
        self.drawn[param_name] = count + 1
        self.log.append(("draw", param_name))
        return self.script[min(count, len(self.script) - 1)][param_name]

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.log.append(("before", trial.number))

    def after_trial(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        state: TrialState,
        values: Sequence[float] | None,
    ) -> None:
        self.log.append(("after", trial.number, state))


def scripted(
    *script: Mapping[str, Any],
    space: Mapping[str, BaseDistribution] = LETTERS,
    seed: int = 0,
) -> tuple[DistinctSampler, list[tuple]]:
    log: list[tuple] = []
    sampler = DistinctSampler(lambda s: Scripted(s, script, log), seed=seed, space=space)
    return sampler, log


def draws(log: list[tuple], name: str = "x") -> int:
    return sum(1 for entry in log if entry == ("draw", name))


def trial(state: TrialState, params: Mapping[str, Any], space: Mapping = LETTERS) -> FrozenTrial:
    """Another trial of the study with ``params``; a WAITING one holds them as an enqueued
    trial does (``fixed_params``, no parameters yet)."""
    if state == TrialState.WAITING:
        return create_trial(state=state, system_attrs={"fixed_params": dict(params)})
    return create_trial(
        state=state,
        value=1.0 if state == TrialState.COMPLETE else None,
        params=dict(params),
        distributions={name: space[name] for name in params},
    )


def propose(sampler: DistinctSampler, others: Sequence[FrozenTrial] = ()) -> dict[str, Any]:
    """What ``sampler`` proposes for the next trial number of a study holding ``others``,
    through the calls Optuna makes (before_trial, then the relative search). The current trial
    is not in the study's storage, so the wrapped sampler must be ``Scripted``; a WAITING
    trial stays waiting (``study.ask`` would take it)."""
    study = optuna.create_study(storage=None, sampler=sampler)
    for other in others:
        study.add_trial(other)
    current = FrozenTrial(
        number=len(study.get_trials(deepcopy=False)),
        state=TrialState.RUNNING,
        value=None,
        datetime_start=datetime.datetime.now(),
        datetime_complete=None,
        params={},
        distributions={},
        user_attrs={},
        system_attrs={},
        intermediate_values={},
        trial_id=-1,
    )
    sampler.before_trial(study, current)
    space = sampler.infer_relative_search_space(study, current)
    return sampler.sample_relative(study, current, space)


def run(sampler: BaseSampler, space: Mapping[str, BaseDistribution], n: int) -> optuna.Study:
    """``n`` trials, one after the other, of a new study with ``sampler`` over ``space``."""
    study = optuna.create_study(storage=None, sampler=sampler)
    for _ in range(n):
        asked = study.ask(fixed_distributions=dict(space))
        study.tell(
            asked, sum(v if isinstance(v, float | int) else ord(v) for v in asked.params.values())
        )
    return study


def params_of(study: optuna.Study) -> list[dict[str, Any]]:
    return [t.params for t in study.trials]


def tpe(seed: int) -> TPESampler:
    # As the tuner builds it (fm_optuna/study/_tuner.py).
    return TPESampler(seed=seed, n_startup_trials=3, constant_liar=True)


def key(params: Mapping[str, Any]) -> tuple:
    return tuple(sorted(params.items()))


# ------------------------------------------------------------------------------------------
# trial_seed
# ------------------------------------------------------------------------------------------


class TestTrialSeed:
    def test_is_numpy_seed_sequence_of_the_study_seed_and_trial_number(self) -> None:
        expected = int(np.random.SeedSequence([7, 3]).generate_state(1)[0])
        assert trial_seed(7, 3) == expected == trial_seed(7, 3)
        assert isinstance(trial_seed(7, 3), int) and 0 <= trial_seed(7, 3) < 2**32

    def test_streams_differ_across_trial_numbers_and_study_seeds(self) -> None:
        seeds = {trial_seed(seed, number) for seed in range(5) for number in range(200)}
        assert len(seeds) == 5 * 200
        # Not a shift of one another: the study seeded 1 does not replay study 0 one trial on.
        assert [trial_seed(1, n) for n in range(5)] != [trial_seed(0, n + 1) for n in range(5)]


# ------------------------------------------------------------------------------------------
# Never another trial's configuration
# ------------------------------------------------------------------------------------------

BLOCKING = [TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING]


class TestDistinct:
    def test_an_untaken_proposal_is_the_wrapped_samplers_own(self) -> None:
        sampler, log = scripted({"x": "a"})
        assert propose(sampler, [trial(TrialState.COMPLETE, {"x": "b"})]) == {"x": "a"}
        assert draws(log) == 1

    @pytest.mark.parametrize("state", BLOCKING, ids=lambda s: s.name)
    def test_a_configuration_of_another_trial_is_never_proposed(self, state: TrialState) -> None:
        sampler, log = scripted({"x": "a"})  # keeps proposing the taken point
        proposed = propose(sampler, [trial(state, {"x": "a"})])
        assert proposed["x"] in {"b", "c"}
        assert draws(log) == ATTEMPTS  # the wrapped sampler was asked again before giving up

    def test_a_failed_trial_does_not_block_its_configuration(self) -> None:
        sampler, _ = scripted({"x": "a"})
        assert propose(sampler, [trial(TrialState.FAIL, {"x": "a"})]) == {"x": "a"}

    def test_a_dead_workers_retry_keeps_its_configuration_blocked(self) -> None:
        # The tuner marks a dead worker's trial FAIL and enqueues its parameters again.
        sampler, _ = scripted({"x": "a"})
        dead = trial(TrialState.FAIL, {"x": "a"})
        retry = trial(TrialState.WAITING, {"x": "a"})
        assert propose(sampler, [dead, retry])["x"] in {"b", "c"}

    def test_a_trial_from_an_earlier_space_blocks_nothing_it_does_not_cover(self) -> None:
        older = trial(TrialState.COMPLETE, {"x": "a"})  # before `n` was searched
        sampler, _ = scripted({"x": "a", "n": 0}, space=GRID)
        assert propose(sampler, [older]) == {"x": "a", "n": 0}

    def test_a_choice_removed_from_the_space_does_not_break_proposals(self) -> None:
        wider = {"x": CategoricalDistribution(["a", "b", "c", "d"])}
        older = trial(TrialState.COMPLETE, {"x": "d"}, wider)
        sampler, _ = scripted({"x": "a"})
        assert propose(sampler, [older]) == {"x": "a"}

    def test_a_redraw_that_is_untaken_is_taken_before_a_random_point(self) -> None:
        sampler, log = scripted({"x": "a"}, {"x": "a"}, {"x": "c"})
        assert propose(sampler, [trial(TrialState.COMPLETE, {"x": "a"})]) == {"x": "c"}
        assert draws(log) == 3

    def test_a_configuration_is_every_parameter_together(self) -> None:
        done = trial(TrialState.COMPLETE, {"x": "a", "n": 1}, GRID)
        sampler, _ = scripted({"x": "a", "n": 2}, space=GRID)
        assert propose(sampler, [done]) == {"x": "a", "n": 2}  # shares x only: not a repeat
        sampler, _ = scripted({"x": "a", "n": 1}, space=GRID)
        assert propose(sampler, [done]) != {"x": "a", "n": 1}

    def test_a_running_trial_of_another_worker_blocks_through_ask(self) -> None:
        sampler, _ = scripted({"x": "a"})
        study = optuna.create_study(storage=None, sampler=sampler)
        first = study.ask(fixed_distributions=dict(LETTERS))  # still running
        second = study.ask(fixed_distributions=dict(LETTERS))
        assert first.params == {"x": "a"} and second.params["x"] in {"b", "c"}

    def test_an_enqueued_trial_keeps_its_parameters_even_when_taken(self) -> None:
        sampler, log = scripted({"x": "b"})
        study = optuna.create_study(storage=None, sampler=sampler)
        study.add_trial(trial(TrialState.COMPLETE, {"x": "a"}))
        study.enqueue_trial({"x": "a"})  # e.g. a dead worker's retry
        retried = study.ask(fixed_distributions=dict(LETTERS))
        assert retried.params == {"x": "a"}
        assert draws(log) == 0  # no proposal was drawn for it

    @pytest.mark.parametrize("make", [RandomSampler, tpe], ids=["random", "tpe"])
    def test_a_study_covers_a_small_space_before_repeating(self, make: Any) -> None:
        points = 3 * 3
        study = run(DistinctSampler(make, seed=0, space=GRID), GRID, points)
        assert len({key(p) for p in params_of(study)}) == points  # every point once
        # The space exhausted, the next trial repeats one rather than failing.
        study.tell(study.ask(fixed_distributions=dict(GRID)), 0.0)
        assert len(study.trials) == points + 1
        assert key(study.trials[-1].params) in {key(p) for p in params_of(study)[:points]}


# ------------------------------------------------------------------------------------------
# When the wrapped sampler keeps repeating itself
# ------------------------------------------------------------------------------------------


class TestFallback:
    def test_an_untried_point_is_taken_at_random_seeded_by_the_trial(self) -> None:
        taken = [trial(TrialState.COMPLETE, {"x": "a"})]

        def pick(seed: int) -> str:
            sampler, _ = scripted({"x": "a"}, seed=seed)
            return propose(sampler, taken)["x"]

        picks = [pick(seed) for seed in range(12)]
        assert set(picks) == {"b", "c"}  # random among the untried, not always the first
        assert picks == [pick(seed) for seed in range(12)]  # and reproducible

    def test_a_stepped_float_is_enumerated(self) -> None:
        space = {"w": FloatDistribution(0.0, 1.0, step=0.5)}
        sampler, _ = scripted({"w": 0.5}, space=space)
        taken = [trial(TrialState.COMPLETE, {"w": 0.5}, space)]
        assert propose(sampler, taken)["w"] in {0.0, 1.0}

    def test_an_exhausted_space_repeats_the_wrapped_samplers_proposal(self) -> None:
        sampler, log = scripted({"x": "b"})
        taken = [trial(TrialState.COMPLETE, {"x": x}) for x in ("a", "b", "c")]
        assert propose(sampler, taken) == {"x": "b"}
        assert draws(log) == ATTEMPTS

    @pytest.mark.parametrize(
        "space",
        [
            {"x": FloatDistribution(0.0, 1.0)},  # continuous: cannot be enumerated
            {"x": IntDistribution(0, ENUMERABLE)},  # one point more than is enumerated
        ],
        ids=["continuous", "too-large"],
    )
    def test_a_space_it_cannot_enumerate_gets_the_repeat(
        self, space: dict[str, BaseDistribution]
    ) -> None:
        sampler, log = scripted({"x": 1}, space=space)
        assert propose(sampler, [trial(TrialState.COMPLETE, {"x": 1}, space)]) == {"x": 1}
        assert draws(log) == ATTEMPTS


# ------------------------------------------------------------------------------------------
# Seeded per trial number
# ------------------------------------------------------------------------------------------


class TestSeeding:
    def test_the_wrapped_sampler_is_made_per_trial_from_its_trial_seed(self) -> None:
        sampler, log = scripted({"x": "a"}, {"x": "b"}, {"x": "c"}, seed=5)
        study = optuna.create_study(storage=None, sampler=sampler)
        for _ in range(3):
            study.tell(study.ask(fixed_distributions=dict(LETTERS)), 0.0)
        made = [entry[1] for entry in log if entry[0] == "make"]
        assert made == [5, trial_seed(5, 0), trial_seed(5, 1), trial_seed(5, 2)]
        # Each trial restarts the script: trials 1 and 2 redraw past the taken points.
        assert [t.params["x"] for t in study.trials] == ["a", "b", "c"]

    @pytest.mark.parametrize("make", [RandomSampler, tpe], ids=["random", "tpe"])
    def test_a_study_replayed_from_scratch_proposes_the_same_trials(self, make: Any) -> None:
        def replay(seed: int) -> list[dict]:
            return params_of(run(DistinctSampler(make, seed=seed, space=CONTINUOUS), CONTINUOUS, 6))

        first = replay(3)
        assert replay(3) == first
        assert replay(4) != first

    def test_two_workers_agree_on_a_trial_number_whatever_they_did_before(self) -> None:
        history = run(DistinctSampler(tpe, seed=1, space=CONTINUOUS), CONTINUOUS, 5).trials
        busy = DistinctSampler(tpe, seed=1, space=CONTINUOUS)
        run(busy, CONTINUOUS, 4)  # this worker has proposed other trials (another study)

        def next_trial(sampler: DistinctSampler) -> dict[str, Any]:
            study = optuna.create_study(storage=None, sampler=sampler)
            study.add_trials(history)
            asked = study.ask(fixed_distributions=dict(CONTINUOUS))
            assert asked.number == len(history)
            return asked.params

        assert next_trial(busy) == next_trial(DistinctSampler(tpe, seed=1, space=CONTINUOUS))

    def test_workers_started_together_draw_from_different_streams(self) -> None:
        drawn: list[int] = []

        def make(seed: int) -> RandomSampler:
            sampler = RandomSampler(seed=seed)
            sample = sampler.sample_independent

            def counted(*args: Any) -> Any:
                drawn.append(seed)
                return sample(*args)

            sampler.sample_independent = counted  # type: ignore[method-assign]
            return sampler

        study = optuna.create_study(
            storage=None, sampler=DistinctSampler(make, seed=0, space=CONTINUOUS)
        )
        one = study.ask(fixed_distributions=dict(CONTINUOUS))
        two = study.ask(fixed_distributions=dict(CONTINUOUS))  # another worker, same moment
        assert one.params != two.params
        # Neither had to redraw: the second worker's first draw was already another point.
        assert drawn == [trial_seed(0, 0)] * 2 + [trial_seed(0, 1)] * 2

    def test_another_process_proposes_the_same(self, tmp_path: Path) -> None:
        script = tmp_path / "propose.py"
        script.write_text(
            "import json, sys\n"
            "sys.path.insert(0, sys.argv[1])\n"
            "import optuna\n"
            "optuna.logging.set_verbosity(optuna.logging.WARNING)\n"
            "from tests.study import test_sampler as t\n"
            "study = t.run(t.DistinctSampler(t.tpe, seed=2, space=t.CONTINUOUS), t.CONTINUOUS, 5)\n"
            "print(json.dumps(t.params_of(study)))\n"
        )
        env = {**os.environ, "PYTHONHASHSEED": "12345"}
        out = subprocess.run(
            [sys.executable, "-W", "error", str(script), str(ROOT)],
            capture_output=True,
            text=True,
            env=env,
            check=True,
            timeout=120,
        )
        here = params_of(run(DistinctSampler(tpe, seed=2, space=CONTINUOUS), CONTINUOUS, 5))
        assert json.loads(out.stdout) == here


# ------------------------------------------------------------------------------------------
# Delegation
# ------------------------------------------------------------------------------------------


class TestDelegation:
    @pytest.mark.parametrize("make", [RandomSampler, tpe], ids=["random", "tpe"])
    def test_each_trial_is_what_the_wrapped_sampler_seeded_for_it_proposes(self, make: Any) -> None:
        trials = run(DistinctSampler(make, seed=9, space=CONTINUOUS), CONTINUOUS, 7).trials
        for number, done in enumerate(trials):
            # The plain sampler seeded with the trial's seed, on the same history.
            alone = optuna.create_study(storage=None, sampler=make(trial_seed(9, number)))
            alone.add_trials(trials[:number])
            assert alone.ask(fixed_distributions=dict(CONTINUOUS)).params == done.params, number

    def test_trial_hooks_reach_the_wrapped_sampler(self) -> None:
        sampler, log = scripted({"x": "a"}, {"x": "b"})
        study = optuna.create_study(storage=None, sampler=sampler)
        study.tell(study.ask(fixed_distributions=dict(LETTERS)), 1.0)
        pruned = study.ask(fixed_distributions=dict(LETTERS))
        study.tell(pruned, state=TrialState.PRUNED)
        hooks = [entry for entry in log if entry[0] in ("before", "after")]
        assert hooks == [
            ("before", 0),
            ("after", 0, TrialState.COMPLETE),
            ("before", 1),
            ("after", 1, TrialState.PRUNED),
        ]

    def test_a_parameter_outside_the_space_is_sampled_by_the_wrapped_sampler(self) -> None:
        sampler, log = scripted({"x": "a", "extra": 7})
        study = optuna.create_study(storage=None, sampler=sampler)
        asked = study.ask(fixed_distributions=dict(LETTERS))
        assert asked.suggest_int("extra", 0, 9) == 7
        assert draws(log, "extra") == 1
