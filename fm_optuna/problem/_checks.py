"""The Problem contract, checked on one draw before any training or store is touched.

A user's problem that breaks the contract would otherwise fail deep inside training (a
``KeyError`` in the pre-pass, in ``tasks.py`` or in the loop) after minutes of work, or run with a
silently wrong setup. :func:`check_problem` turns each such mistake into one line naming the
problem, the task and what was expected.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import nn

from fm_optuna.errors import ConfigError, ProblemWarning
from fm_optuna.problem._tasks import Problem, Task

if TYPE_CHECKING:
    from collections.abc import Sequence


def _label(problem: Problem) -> str:
    return f"Problem `{getattr(problem, 'name', None) or type(problem).__name__}`"


def _fail(problem: Problem, what: str) -> ConfigError:
    return ConfigError(f"{_label(problem)}: {what}")


def check_problem(problem: Problem) -> None:
    """Check ``problem`` against the :class:`~fm_optuna.problem.Problem` contract, cheaply.

    One model is made and one training draw and one validation pass are computed (the global
    torch random state is left as it was, so seeded runs are unaffected):

    - ``name``, ``tasks`` (distinct :class:`~fm_optuna.problem.Task` s), ``target`` (one of the
      tasks) and ``device`` are set;
    - ``task_losses`` returns, for every requested task, a finite scalar tensor that depends on
      the model's parameters;
    - ``evaluate(model, "val")`` returns every task's primary metric, every metric a plain
      number (a tensor would break logging and the study mid-run);
    - ``shared_parameters`` is a non-empty subset of the trainable parameters; when it is all of
      them a :class:`ProblemWarning` says that gradient baselines and the lookahead affinity will
      treat the task heads as trunk;
    - ``describe()`` returns a mapping with string keys.

    Raises:
        ConfigError: The first broken rule, in one line.

    Example:
        >>> from fm_optuna.benchmarks import build_problem
        >>> check_problem(build_problem("digits", check=False))  # doctest: +SKIP
    """
    _check_attributes(problem)
    devices = [problem.device] if problem.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            model = problem.make_model()
            if not isinstance(model, nn.Module):
                raise _fail(
                    problem, f"make_model() should return a torch nn.Module. Found {model!r}."
                )
            model = model.to(problem.device)
            _check_shared_parameters(problem, model)
            _check_losses(problem, model, problem.task_names)
            _check_metrics(problem, model)
        _check_describe(problem)
    except ConfigError:
        raise
    except Exception as error:  # the problem's own code failed on its first draw
        lines = str(error).strip().splitlines()
        what = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
        raise _fail(
            problem,
            f"its methods should run on one draw (make_model, task_losses, evaluate, "
            f"describe); one raised {what}.",
        ) from None


def _check_attributes(problem: Problem) -> None:
    name = getattr(problem, "name", None)
    if not isinstance(name, str) or not name:
        raise _fail(problem, f"`name` should be set to a non-empty string. Found `{name!r}`.")
    tasks = getattr(problem, "tasks", None)
    if not tasks or not all(isinstance(task, Task) for task in tasks):
        raise _fail(problem, f"`tasks` should be a non-empty tuple of Task. Found `{tasks!r}`.")
    names = [task.name for task in tasks]
    if len(set(names)) != len(names):
        raise _fail(problem, f"task names should be distinct. Found {', '.join(names)}.")
    target = getattr(problem, "target", None)
    if target not in names:
        raise _fail(
            problem,
            f"the target should be one of its tasks ({', '.join(names)}). Found `target = "
            f"{target}`.",
        )
    if not isinstance(getattr(problem, "device", None), torch.device):
        raise _fail(
            problem,
            f"`device` should be a torch.device. Found `{getattr(problem, 'device', None)!r}`.",
        )


def _check_shared_parameters(problem: Problem, model: nn.Module) -> None:
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    shared = {id(p) for p in problem.shared_parameters(model)}
    if not shared:
        raise _fail(
            problem,
            "shared_parameters(model) should return the trunk's parameters (every task's loss "
            "goes through them). Found none.",
        )
    if not shared <= trainable:
        raise _fail(
            problem,
            "shared_parameters(model) should return trainable parameters of that model. Found "
            f"{len(shared - trainable)} that are not.",
        )
    if shared == trainable:
        warnings.warn(
            f"{_label(problem)}: shared_parameters(model) returns every trainable parameter (no "
            "task head found; the default looks for `heads.`), so the gradient baselines (MGDA, "
            "PCGrad, GCS, ...) and the lookahead affinity treat the task heads as trunk. Put "
            "the heads under `model.heads` or override shared_parameters.",
            ProblemWarning,
            stacklevel=3,
        )


def _check_losses(problem: Problem, model: nn.Module, tasks: Sequence[str]) -> None:
    generator = torch.Generator(device=problem.device).manual_seed(0)
    losses = problem.task_losses(model, list(tasks), generator)
    if not isinstance(losses, Mapping):
        raise _fail(
            problem, f"task_losses should return a dict task → loss. Found {type(losses).__name__}."
        )
    for task in tasks:
        loss = losses.get(task)
        expected = f"task `{task}`: task_losses(model, {list(tasks)}, generator) should return"
        if not isinstance(loss, torch.Tensor):
            found = "no entry" if task not in losses else type(loss).__name__
            raise _fail(problem, f"{expected} a scalar tensor for it. Found {found}.")
        if loss.numel() != 1:
            raise _fail(problem, f"{expected} a scalar loss. Found shape {tuple(loss.shape)}.")
        value = float(loss.detach())
        if not math.isfinite(value):
            raise _fail(problem, f"{expected} a finite loss. Found {value}.")
        if not loss.requires_grad:
            raise _fail(
                problem,
                f"{expected} a loss computed from the model's parameters (it does not require "
                "grad: computed under no_grad or detached?).",
            )


def _check_metrics(problem: Problem, model: nn.Module) -> None:
    everything = problem.evaluate(model, "val")
    target_only = problem.evaluate(model, "val", [problem.target])
    calls = [(task, everything, 'evaluate(model, "val")') for task in problem.tasks]
    target = problem.task(problem.target)
    calls.append((target, target_only, f'evaluate(model, "val", ["{target.name}"])'))
    for task, metrics, call in calls:
        found = metrics.get(task.name) if isinstance(metrics, Mapping) else None
        if not isinstance(found, Mapping) or task.metric not in found:
            shown = "no entry" if found is None else ", ".join(map(str, found)) or "nothing"
            raise _fail(
                problem,
                f"task `{task.name}`: {call} should return its primary metric `{task.metric}` "
                f"(Task.metric). Found {shown}.",
            )
        for metric, value in found.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                hint = " (use .item())" if isinstance(value, torch.Tensor) else ""
                raise _fail(
                    problem,
                    f"task `{task.name}`: {call} should return plain numbers (float) as metrics. "
                    f"Found `{metric}` of type {type(value).__name__}{hint}.",
                )


def _check_describe(problem: Problem) -> None:
    described = problem.describe()
    if not isinstance(described, Mapping) or not all(isinstance(k, str) for k in described):
        raise _fail(
            problem,
            f"describe() should return a flat dict with string keys. Found {described!r:.80}.",
        )
