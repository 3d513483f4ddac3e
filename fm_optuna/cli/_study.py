"""``fm-optuna tune``: create or resume the outer study of a study file."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
from typing import Any

import optuna
from tqdm.auto import tqdm

from fm_optuna.cli._common import (
    add_runtime,
    add_tracking,
    torch_devices,
)
from fm_optuna.cli._options import add_flags, study_flags, values
from fm_optuna.core._events import MergeCompleted, Observer
from fm_optuna.core._progress import ProgressLines, progress_stream
from fm_optuna.tracking.uris import absolute_uri

STATES = ("COMPLETE", "PRUNED", "FAIL")


class TrialProgress(Observer):
    """Shows the current outer trial's round, step and target validation metric on the study's
    progress bar."""

    def __init__(
        self, bar: tqdm, trial: optuna.Trial, rounds: int, *, higher_is_better: bool = True
    ) -> None:
        self.bar, self.trial, self.rounds = bar, trial, rounds
        self.sign = 1.0 if higher_is_better else -1.0

    def on_merge_completed(self, event: MergeCompleted) -> None:
        best = _best_value(self.trial.study)
        self.bar.set_postfix_str(
            f"trial {self.trial.number}: round {event.round}/{self.rounds} step {event.step} "
            f"val {self.sign * event.decision.score:.2f} | best {best}"
        )


def _best_value(study: optuna.Study) -> str:
    try:
        return f"{study.best_value:.2f}"
    except ValueError:
        return "-"


def cmd_tune(args: argparse.Namespace) -> int:
    from fm_optuna.study._spec import load_spec
    from fm_optuna.study._tuner import Tuner, finished_trials

    spec = load_spec(args.spec)
    study = dataclasses.replace(
        spec.study, **values(args, study_flags(("storage", "n_trials")), from_spec=True)
    )
    devices = torch_devices(args, spec)  # one per branch with parallel_branches
    bar = tqdm(
        total=study.n_trials,
        desc=f"study {spec.study.name}",
        unit="trial",
        disable=None,
        file=sys.stderr,
    )

    lines = progress_stream(json_output=args.json)

    def observers(trial: optuna.Trial, config: Any) -> list[Observer]:
        shown: list[Observer] = [
            TrialProgress(bar, trial, config.rounds, higher_is_better=tuner.higher_is_better)
        ]
        if lines is not None:
            shown.append(ProgressLines(lines, prefix=f"trial {trial.number}"))
        return shown

    tracking = None
    if not args.no_tracking:
        from fm_optuna.tracking import study_tracking

        tracking = study_tracking(args.tracking_uri or spec.study.tracking_uri, spec.study.name)

    tuner = Tuner(
        spec,
        storage=study.storage,
        n_trials=study.n_trials,
        observers=observers,
        device=devices,
        tracking=tracking,
        allow_config_change=args.allow_config_change,
    )

    def advance(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        bar.n = min(len(finished_trials(study)), bar.total)
        bar.set_postfix_str(f"trial {trial.number} {trial.state.name} | best {_best_value(study)}")
        bar.refresh()
        if lines is not None:
            print(trial_line(study, trial), file=lines, flush=True)

    try:
        report = tuner.run(callbacks=[advance])
    finally:
        bar.close()
    if args.json:
        print(json.dumps(report.__dict__, default=lambda o: o.__dict__, indent=2))
    else:
        print_tune_report(report, tuner)
    return _all_failed(tuner.ran)


def _all_failed(ran: list[optuna.trial.FrozenTrial]) -> int:
    """Exit 1, with one line saying why, when every trial this invocation ran failed."""
    from fm_optuna.cli import EXIT_FAILED

    if not ran or any(t.state != optuna.trial.TrialState.FAIL for t in ran):
        return 0
    last = ran[-1]
    reason = last.user_attrs.get("fail_reason") or "no reason recorded (see the log above)"
    print(
        f"fm-optuna tune: error: every trial of this invocation failed ({len(ran)} of "
        f"{len(ran)}; the last, trial {last.number}: {reason})",
        file=sys.stderr,
    )
    return EXIT_FAILED


def trial_line(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> str:
    """Optuna's own per-trial log line (``Trial 3 finished with value: ...``)."""
    if trial.state == optuna.trial.TrialState.COMPLETE:
        best = study.best_trial
        return (
            f"Trial {trial.number} finished with value: {trial.value} and parameters: "
            f"{trial.params}. Best is trial {best.number} with value: {best.value}."
        )
    if trial.state == optuna.trial.TrialState.PRUNED:
        step = max(trial.intermediate_values, default=None)
        return f"Trial {trial.number} pruned at step {step} (parameters: {trial.params})."
    return f"Trial {trial.number} {trial.state.name.lower()} (parameters: {trial.params})."


def print_tune_report(report: Any, tuner: Any) -> None:
    """The study's trials, the best one against the baselines, and where to browse it all."""
    from fm_optuna.study._tuner import mask_password, target_metric_name

    print(
        f"study {report.study_name} on {report.storage}: {len(report.trials)} trials "
        f"({', '.join(f'{s} {sum(t.state == s for t in report.trials)}' for s in STATES)})"
    )
    for trial in report.trials:
        value = "-" if trial.value is None else f"{trial.value:.4f}"
        params = ", ".join(f"{k}={v}" for k, v in trial.params.items())
        print(f"  trial {trial.number:>3}  {trial.state:<8} {value:>8}  {params}")
        if trial.reason is not None:
            print(f"      {trial.reason}")
    if report.best_params is None:
        print("no trial has completed yet")
        return
    params = ", ".join(f"{k}={v}" for k, v in report.best_params.items())
    print(f"best trial #{report.best_trial}: {params}")
    metric = target_metric_name(tuner.problem).removeprefix("target_val/")
    print(f"  target validation {metric} {report.best_value:.4f}")
    if report.best_test is not None:
        test = ", ".join(f"{k} {v:.4f}" for k, v in report.best_test.items())
        print(
            f"  target test ({tuner.problem.target}, from the saved final model "
            f"{report.best_model}): {test}"
        )
    if report.baselines:
        _print_against_baselines(report, tuner.problem.task(tuner.problem.target))
    storage = mask_password(absolute_uri(tuner.storage_url))
    artifacts = shlex.quote(str(tuner.artifact_dir))  # the trials' Λ figures
    if storage.lower().startswith("grpc://"):  # optuna-dashboard reads the database itself
        print(
            f"browse: optuna-dashboard DATABASE_URL --artifact-dir {artifacts} (DATABASE_URL: "
            f"the storage the proxy at {storage} serves)"
        )
    else:
        print(f"browse: optuna-dashboard {shlex.quote(storage)} --artifact-dir {artifacts}")
    for line in report.tracking.get("browse", []):
        print(f"browse: {line}")


def _print_against_baselines(report: Any, target: Any) -> None:
    metric, sign = report.target_metric, 1.0 if target.higher_is_better else -1.0
    best_test = (report.best_test or {}).get(metric)
    print(f"best trial vs baselines at the same budget (target {target.name}, {metric}):")
    print(f"  {'method':<22} {'val':>8} {'test':>8} {'ForkMerge gain':>15}")
    rows = [(f"ForkMerge (trial #{report.best_trial})", report.best_value, best_test)]
    rows += [(name.upper(), r["val"], r["test"]) for name, r in report.baselines.items()]
    for name, val, test in rows:
        gap = "-" if best_test is None or test is None else f"{sign * (best_test - test):+.2f}"
        test_text = "-" if test is None else f"{test:.2f}"
        print(f"  {name:<22} {val:>8.2f} {test_text:>8} {gap:>15}")


def add_command(sub: Any) -> None:
    """Register ``tune``."""
    tune = sub.add_parser(
        "tune",
        help="create or resume the outer Optuna study of a spec (Δt, L, ...)",
        description="Create or resume the outer study described by studies/x.toml. Each "
        "trial trains ForkMerge, reports the target validation score after every "
        "merge (pruning) and returns the final one. Run the same command on "
        "several machines against one PostgreSQL storage to share the study.",
    )
    tune.add_argument("spec", help="a study specification, e.g. studies/digits.toml")
    add_flags(tune, study_flags(("storage", "n_trials")), from_spec=True)
    tune.add_argument(
        "--allow-config-change",
        action="store_true",
        help="continue a study whose recorded configuration (problem, training, search, space, "
        "seed) differs from the spec's, as a new configuration version; its trials from now on "
        "are tagged config_version (without the flag such a run is refused)",
    )
    add_tracking(tune)
    add_runtime(tune)
    tune.set_defaults(handler=cmd_tune)
