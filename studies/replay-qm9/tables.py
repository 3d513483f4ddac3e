"""The QM9 replay tables of studies/RESULTS.md, from the replays saved in this folder.

Each folder holds the ``replay.json`` of one ``fm-optuna compare --replay`` invocation
(commands in studies/RESULTS.md, section "The same comparison on QM9"). Replays of different
merges pool exactly: each merge's best known Λ is its own. Regret is in % of the best known
validation MAE.

    python studies/replay-qm9/tables.py
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
FIXED_DESIGNS = ("grid", "greedy")
TOLERANCE = 0.1  # % of the best known MAE


def load(folders: Sequence[str]) -> tuple[list[dict[str, Any]], dict[str, float]]:
    runs: list[dict[str, Any]] = []
    best: dict[str, float] = {}
    for folder in folders:
        data = json.loads((HERE / folder / "replay.json").read_text())
        runs += data["runs"]
        best.update(data["best_known"])
    return runs, best


def relative_regret(run: dict[str, Any], best: dict[str, float]) -> float:
    return 100 * run["regret"] / abs(best[run["problem"]])


def spread(values: Sequence[float]) -> str:
    deviation = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {deviation:.2f}"


def cell(runs: Sequence[dict[str, Any]], best: dict[str, float]) -> str:
    if not runs:
        return "—"
    regrets = [relative_regret(r, best) for r in runs]
    within = sum(x <= TOLERANCE + 1e-9 for x in regrets)
    return f"{spread(regrets)} ({within}/{len(runs)})"


def strategy_table(title: str, folders: Sequence[str]) -> None:
    runs, best = load(folders)
    by = defaultdict(list)
    for run in runs:
        by[run["strategy"]].append(run)
    budgets = sorted({r["budget"] for r in runs if r["strategy"] not in FIXED_DESIGNS})
    print(f"\n{title} ({len(best)} merges)\n")
    print("| strategy | " + " | ".join(map(str, budgets)) + " | s / eval |")
    print("| --- " * (len(budgets) + 2) + "|")
    for name in sorted(by):
        chosen = by[name]
        per_eval = sum(r["seconds"] for r in chosen) / sum(r["evaluations"] for r in chosen)
        if name in FIXED_DESIGNS:
            evals = statistics.mean(r["evaluations"] for r in chosen)
            empty = " |" * (len(budgets) - 1)
            print(
                f"| {name} (fixed design) | {cell(chosen, best)} at {evals:.0f} evals |{empty}"
                f" {per_eval:.2f} |"
            )
            continue
        cells = [cell([r for r in chosen if r["budget"] == b], best) for b in budgets]
        print(f"| {name} | " + " | ".join(cells) + f" | {per_eval:.2f} |")


def pruned_rows(title: str, folders: Sequence[str], strategies: Sequence[str]) -> None:
    runs, best = load(folders)
    by = defaultdict(list)
    for run in runs:
        by[run["strategy"]].append(run)
    for name in sorted(by, key=lambda n: (n.split("+")[0], "+" in n, n)):
        base_name = name.split("+")[0]
        if base_name not in strategies:
            continue
        chosen, base = by[name], by[base_name]
        full = statistics.mean(r["passes"] for r in base)
        passes = statistics.mean(r["passes"] for r in chosen)
        regrets = [relative_regret(r, best) for r in chosen]
        within = sum(x <= TOLERANCE + 1e-9 for x in regrets)
        reference = {r["problem"]: relative_regret(r, best) for r in base}
        worse = sum(
            relative_regret(r, best) > reference[r["problem"]] + TOLERANCE + 1e-9 for r in chosen
        )
        label = name if "+" in name else f"{name}, full ({title})"
        print(
            f"| {label} | {len(chosen)} | {passes:.1f} ({100 * passes / full:.0f} %) | "
            f"{spread(regrets)} | {within}/{len(chosen)} | {worse if '+' in name else '—'} |"
        )


if __name__ == "__main__":
    strategy_table("QM9 L = 3", ["L3s0", "L3s1", "L3s2"])
    strategy_table("QM9 L = 4", ["L4"])
    strategy_table("QM9 L = 5", ["L5"])
    strategy_table("QM9 pairwise, L = 11", ["PW"])
    print("\nPruned candidate evaluation\n")
    print(
        "| variant | merges | passes (share of full) | regret (% of best MAE) | within 0.1 % "
        "| worse than full by > 0.1 % |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    pruned_rows("L = 3", ["pruned-L3s0", "pruned-L3s1", "pruned-L3s2"], ["grid"])
    everywhere = ["pruned-L3s0", "pruned-L3s1", "pruned-L3s2", "pruned-L4", "pruned-PW"]
    pruned_rows("L = 3, 4, pairwise", everywhere, ["random", "tpe"])
