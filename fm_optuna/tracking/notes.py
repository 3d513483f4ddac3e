"""The ForkMerge run's description in MLflow: the Λ table per merge, rewritten at every merge.

MLflow shows a run's ``mlflow.note.content`` tag as markdown at the top of the run's overview,
so this is the first thing a user sees of a ForkMerge run: Λ per branch at every merge, the
merged model's validation score against the best single branch, and where the figures are.
Plain data in, text out; no MLflow.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class MergeRow:
    """One merge as the note shows it."""

    round: int
    step: int
    weights: tuple[float, ...]
    score: float  # merged model's target validation score
    best_branch: str  # the branch that scored best alone at this merge
    best_branch_score: float

    @property
    def gain(self) -> float:
        return self.score - self.best_branch_score


def _number(value: float, digits: int = 2) -> str:
    return f"{value:.{digits}f}" if math.isfinite(value) else "–"


def _signed(value: float) -> str:
    return f"{value:+.2f}" if math.isfinite(value) else "–"


def lambda_note(
    title: str,
    branches: Sequence[str],
    tasks: Sequence[str],
    rows: Sequence[MergeRow],
    *,
    rounds: int | None = None,
    figures: Sequence[str] = (),
    images: Sequence[tuple[str, str]] = (),
    limit: int = 8000,
) -> str:
    """Markdown: a headline, the Λ figure, the Λ table (one row per merge), what it means.

    ``images`` are (caption, URL) pairs shown above the table (the UI serves a run's artifacts
    at a relative ``get-artifact`` URL). Longer than ``limit`` characters (MLflow's tag limit),
    the table keeps its latest rows and says how many earlier ones ``lambda_trajectory.csv``
    holds.

    Example:
        >>> row = MergeRow(1, 100, (0.7, 0.3), 81.0, "target", 80.0)
        >>> print(lambda_note("fm", ["target", "all"], ["target", "target+mnist"], [row]))
        ... # doctest: +ELLIPSIS
        ### Λ per merge · fm
        ...
        | 1 | 100 | **0.70** | 0.30 | 81.00 | target 80.00 | +1.00 |
        ...
    """
    done = f"{len(rows)} of {rounds}" if rounds else str(len(rows))
    # The figure first: MLflow shows the top of a long description until "Show more".
    pictures = [line for caption, url in images for line in (f"![{caption}]({url})", "")]
    lines = [
        f"### Λ per merge · {title}",
        "",
        *pictures,
        "| round | step | " + " | ".join(f"Λ `{b}`" for b in branches)
        + " | merged val | best branch alone | gain |",
        "|---:|---:|" + "---:|" * len(branches) + "---:|---|---:|",
    ]  # fmt: skip
    table = [_table_row(row) for row in rows]
    tail = [""]
    if rows:
        last = rows[-1]
        chosen = max(range(len(branches)), key=lambda i: last.weights[i])
        wins = sum(row.gain > 0 for row in rows)
        tail += [
            f"**{done} merges** · latest Λ puts **{last.weights[chosen]:.2f}** on "
            f"`{branches[chosen]}` · merged validation score **{_number(last.score)}** "
            f"({_signed(last.gain)} vs the best branch alone, `{last.best_branch}`) · the merge "
            f"beat every single branch at {wins} of {len(rows)} merges. Λ: the weights of "
            "θ* = Σ Λ_b θ_b, chosen on the target's validation set (largest in bold).",
        ]
    else:
        tail += [f"No merge yet (0 of {rounds or '?'} merges)."]
    tail += ["", "Branches (tasks trained together):", ""]
    tail += [f"- `{name}`: {task_list}" for name, task_list in zip(branches, tasks, strict=True)]
    if figures:
        tail += [
            "",
            "Figures (Artifacts tab, redrawn at every merge): "
            + ", ".join(f"`{name}`" for name in figures)
            + ". Series: `lambda/<branch>`, `val/score`, `merge/gain`; one child run per branch.",
        ]
    budget = limit - sum(len(line) + 1 for line in [*lines, *tail]) - 200
    kept = len(table)
    while kept > 0 and sum(len(line) + 1 for line in table[-kept:]) > budget:
        kept -= 1
    if kept < len(table):
        omitted = len(table) - kept
        lines.append(f"| … | {omitted} earlier merges in `lambda_trajectory.csv` |")
    return "\n".join([*lines, *table[len(table) - kept :], *tail]) + "\n"


def _table_row(row: MergeRow) -> str:
    top = max(range(len(row.weights)), key=lambda i: row.weights[i])
    cells = [f"**{w:.2f}**" if i == top else f"{w:.2f}" for i, w in enumerate(row.weights)]
    return (
        f"| {row.round} | {row.step} | {' | '.join(cells)} | {_number(row.score)} | "
        f"{row.best_branch} {_number(row.best_branch_score)} | {_signed(row.gain)} |"
    )


@dataclass(frozen=True)
class TrialRow:
    """One outer-study trial as the study run's description shows it."""

    number: int
    state: str
    params: dict[str, object]
    value: float | None
    reason: str | None  # why it failed or was pruned
    run_id: str | None  # its ForkMerge run in MLflow


def _cell(value: object) -> str:
    if isinstance(value, float):
        return _number(value, 4) if abs(value) < 1e4 else f"{value:.4g}"
    return "–" if value is None else str(value).replace("|", "/")


def study_note(
    study: str,
    experiment_id: str,
    trials: Sequence[TrialRow],
    best: TrialRow | None,
    lambdas: dict[str, float],
    baselines: Sequence[tuple[str, dict[str, object], str | None]],
    *,
    images: Sequence[tuple[str, str]] = (),
    limit: int = 8000,
) -> str:
    """Markdown for the study's run: the best trial and its Λ, every trial, the baselines.

    Links are the UI's own routes (``#/experiments/<id>/runs/<run>``), so a click on one stays
    in the page's view.

    Example:
        >>> rows = [TrialRow(0, "COMPLETE", {"dt": 10}, 0.5, None, "abc")]
        >>> print(study_note("s", "1", rows, rows[0], {"target": 1.0}, []))  # doctest: +ELLIPSIS
        ### Study `s` · best trial 0: value **0.5000** (dt=10)
        ...
        | [0](#/experiments/1/runs/abc) | COMPLETE | 10 | 0.5000 | – |
        ...
    """

    def link(number: object, run_id: str | None) -> str:
        return f"[{number}](#/experiments/{experiment_id}/runs/{run_id})" if run_id else str(number)

    names = sorted({name for trial in trials for name in trial.params})
    counts = {s: sum(t.state == s for t in trials) for s in ("COMPLETE", "PRUNED", "FAIL")}
    lines = []
    if best is not None:
        lines += [
            f"### Study `{study}` · best trial {best.number}: value **{_cell(best.value)}** "
            f"({', '.join(f'{k}={v}' for k, v in best.params.items())})",
            "",
        ]
        lines += [line for caption, url in images for line in (f"![{caption}]({url})", "")]
        if lambdas:
            lines += [
                "| best trial | " + " | ".join(f"Λ `{b}`" for b in lambdas) + " |",
                "|---|" + "---:|" * len(lambdas),
                f"| {link(f'trial {best.number} (its Λ per merge)', best.run_id)} | "
                + " | ".join(f"{w:.2f}" for w in lambdas.values())
                + " |",
                "",
                "Λ of the last merge; the trial's own page holds the Λ table of every merge.",
                "",
            ]
    else:
        lines += [f"### Study `{study}` · no complete trial yet", ""]
    lines += [
        f"**{len(trials)} trials**: {counts['COMPLETE']} complete, {counts['PRUNED']} pruned, "
        f"{counts['FAIL']} failed.",
        "",
        "| trial | state | " + " | ".join(f"`{n}`" for n in names) + " | value | reason |",
        "|---:|---|" + "---:|" * len(names) + "---:|---|",
    ]
    rows = [
        f"| {link(t.number, t.run_id)} | {t.state} | "
        + " | ".join(_cell(t.params.get(n)) for n in names)
        + f" | {_cell(t.value)} | {_cell((t.reason or '')[:80]) if t.reason else '–'} |"
        for t in trials
    ]
    tail = [""]
    if baselines:
        tail += [
            "Baselines (trained once with the best trial's budget):",
            "",
            "| baseline | target val | target test | seconds |",
            "|---|---:|---:|---:|",
        ]
        tail += [
            f"| {link(method, run_id)} | {_cell(r.get('val'))} | {_cell(r.get('test'))} | "
            f"{_cell(r.get('seconds'))} |"
            for method, r, run_id in baselines
        ]
    budget = limit - sum(len(line) + 1 for line in [*lines, *tail]) - 100
    kept = len(rows)
    while kept > 0 and sum(len(line) + 1 for line in rows[:kept]) > budget:
        kept -= 1
    if kept < len(rows):
        rows = [*rows[:kept], f"| … | {len(rows) - kept} more trials in optuna-dashboard |"]
    return "\n".join([*lines, *rows, *tail]) + "\n"


def decision_table(round_index: int, step: int, branches: Sequence[str], decision: Any) -> str:
    """One merge decision as a compact Markdown table (``merges/round_NNN.md`` beside the JSON):
    the chosen Λ, then every inner trial rounded, in the order the search ran them."""
    chosen = ", ".join(
        f"{b} {_number(w, 3)}" for b, w in zip(branches, decision.weights, strict=True)
    )
    lines = [
        f"### Round {round_index}, step {step}: Λ = {chosen} (score {_number(decision.score)}; "
        f"{decision.strategy}, {decision.n_trials} trials, {decision.seconds:.2f} s)",
        "",
        f"| trial | Λ ({', '.join(branches)}) | search score (higher is better) | state | source |",
        "| ---: | --- | ---: | --- | --- |",
    ]
    for trial in decision.trials:
        weights = ", ".join(_number(w, 3) for w in trial.weights)
        lines.append(
            f"| {trial.number} | {weights} | {_number(trial.score)} | {trial.state} | "
            f"{trial.source} |"
        )
    if decision.fallback:
        lines += ["", f"Fallback: {decision.fallback}"]
    return "\n".join(lines) + "\n"
