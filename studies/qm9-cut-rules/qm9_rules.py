"""Δm over STL of ForkMerge with two cut rules on QM9, from `compare-methods` outputs.

Reads <rule>-<target>-s<seed>/methods.json beside this file: one `compare-methods --methods
stl,forkmerge --seeds 1` run per rule, target and seed, from qm9_<rule>_s<seed>.toml (a copy of
studies/qm9.toml with `[study] seed` set). Both rules start from the same seed, so they share the
STL run and the pre-pass ranking; only the branches Alg. 4 keeps differ. Δm per target and seed =
(STL − ForkMerge) / STL on the test MAE (Appendix C.1, lower is better), averaged over seeds,
then over targets (as `compare-methods` does).

Prints, for every rule, target and seed, the branches kept (and those the rule would keep with the
default L = 4, planned from the same ranking, not trained) and how far the largest pre-pass drop
stands out of the others (the `auto` rule cuts at a drop only above its threshold); then the
test-MAE table, Δm per target, and the paired comparison: per seed, Δm over the targets of `gaps`
minus that of `auto`, with its spread over the seeds. Where merge-<target>-s<seed> runs exist
(ForkMerge only, `ranking = "merge"`: the Λ_k of one Alg. 2 merge of the pairwise branches as
relevance, cut `auto`), it adds them against the same STL and paired with `auto`.

    PYTHONPATH=. python studies/qm9-cut-rules/qm9_rules.py    # μ, HOMO and LUMO
    PYTHONPATH=. python studies/qm9-cut-rules/qm9_rules.py mu # one target
"""

from __future__ import annotations

import itertools
import json
import math
import statistics
import sys
from pathlib import Path

from fm_optuna.core._branches import make_plan

HERE = Path(__file__).parent
RULES = ("gaps", "auto")
TARGETS = sys.argv[1:] or ["mu", "homo", "lumo"]
T_95 = {2: 12.71, 3: 4.30, 4: 3.18, 5: 2.78}  # two-sided 95 % t quantile by number of seeds


def runs(rule: str, target: str) -> dict[int, dict]:
    """Seed → the compare-methods run of ``rule`` on ``target``."""
    found = {}
    for path in sorted(HERE.glob(f"{rule}-{target}-s*/methods.json")):
        for run in json.loads(path.read_text())["runs"]:
            found[run["seed"]] = run
    return found


def test_mae(run: dict, method: str) -> float | None:
    return next((r["target_test"] for r in run["results"] if r["method"] == method), None)


def kept(run: dict) -> str:
    """The intermediate branches, e.g. ``top5`` (the plan always keeps target only and all)."""
    names = [n.removeprefix("target+") for n in run["forkmerge"]["branches"]]
    return ",".join(n for n in names if n not in ("target", "all")) or "-"


def standout(relevance: list[float]) -> str:
    """Largest drop / median drop, against the `auto` threshold (fm_optuna.core._branches)."""
    drops = [a - b for a, b in itertools.pairwise(relevance)]
    largest = max(range(len(drops)), key=lambda i: drops[i])
    ratio = drops[largest] / statistics.median(drops)
    threshold = max(8.0, 4.0 * math.sqrt(len(drops)))
    return (
        f"largest drop at top{largest + 1}: {ratio:.1f} × median (stands out above {threshold:.0f})"
    )


def planned_at(run: dict, rule: str, n_branches: int) -> str:
    """What ``rule`` would keep with ``n_branches`` on this run's ranking (planned, not trained)."""
    ranking = run["forkmerge"]["ranking"]
    plan = make_plan(
        "pruned",
        target=run["target"],
        ranked_auxiliaries=ranking["order"],
        n_branches=n_branches,
        relevance=ranking["relevance"],
        cut=rule,
    )
    return ",".join(b.name.removeprefix("target+") for b in plan[1:-1])


def fmt(values: list[float], scale: float = 1.0, sign: str = "", digits: int = 3) -> str:
    mean, std = statistics.mean(values), statistics.stdev(values)
    return f"{scale * mean:{sign}.{digits}f} ± {scale * std:.{digits}f}"


def relative(stl: list[float], fm: list[float]) -> list[float]:
    return [(b - m) / b for b, m in zip(stl, fm, strict=True)]


Runs = dict[str, dict[str, dict[int, dict]]]  # rule → target → seed → run


def print_plans(by_rule: Runs, seeds: list[int]) -> dict[str, list[float]]:
    """Print each run's branches and ranking; return STL's test MAE per target (seed order)."""
    stl: dict[str, list[float]] = {}
    for target in TARGETS:
        for rule in RULES:
            for s in seeds:
                run = by_rule[rule][target][s]
                ranking = run["forkmerge"]["ranking"]
                print(
                    f"{rule:5} {target:5} seed {s}: kept {kept(run):6} "
                    f"(at L = 4: {planned_at(run, rule, 4) + ')':11} "
                    f"{standout(ranking['relevance'])}; ranking {','.join(ranking['order'])}"
                )
        gaps, auto = by_rule["gaps"][target], by_rule["auto"][target]
        # The μ runs of `auto` trained ForkMerge only (STL is the `gaps` runs' on the same seed).
        pairs = [(test_mae(gaps[s], "stl"), test_mae(auto[s], "stl")) for s in seeds]
        stl[target] = [g if g is not None else a for g, a in pairs]
        both = [(g, a) for g, a in pairs if g is not None and a is not None]
        same_stl = (
            f"identical under both rules on {sum(g == a for g, a in both)} of {len(both)} seeds"
            if both
            else "trained in one rule's runs only"
        )
        same_order = all(
            gaps[s]["forkmerge"]["ranking"]["order"] == auto[s]["forkmerge"]["ranking"]["order"]
            for s in seeds
        )
        print(f"{target}: STL {same_stl}; same pre-pass ranking under both rules: {same_order}")
    return stl


def print_table(
    by_rule: Runs, seeds: list[int], stl: dict[str, list[float]], per_seed: dict[str, list[float]]
) -> None:
    print("\ntest MAE (mean ± std over seeds) and Δm over the targets")
    seed_list = ", ".join(map(str, seeds))
    print(f"| method | branches kept (seeds {seed_list}) | " + " | ".join(TARGETS) + " | Δm |")
    print("| STL | — | " + " | ".join(fmt(stl[t]) for t in TARGETS) + " | 0 |")
    for r in RULES:
        branches = "; ".join(
            f"{t}: " + ", ".join(kept(by_rule[r][t][s]) for s in seeds) for t in TARGETS
        )
        cells = " | ".join(
            fmt([test_mae(by_rule[r][t][s], "forkmerge") for s in seeds]) for t in TARGETS
        )
        print(f"| {r} | {branches} | {cells} | {100 * statistics.mean(per_seed[r]):+.1f} % |")


def print_paired(per_target: dict[str, dict[str, list[float]]], seeds: list[int]) -> None:
    print("\npaired, gaps − auto, in points of Δm (per seed: " + ", ".join(map(str, seeds)) + ")")
    pairs = []
    for t in TARGETS:
        diff = [g - a for g, a in zip(per_target["gaps"][t], per_target["auto"][t], strict=True)]
        pairs += diff
        values = ", ".join(f"{100 * d:+.1f}" for d in diff)
        print(f"{t:5}: {values}  → {fmt(diff, 100, '+', 1)}")
    ties = sum(d == 0 for d in pairs)  # both rules kept the same branches: the same run
    print(
        f"target-seed pairs where gaps is better: {sum(d > 0 for d in pairs)}, auto: "
        f"{sum(d < 0 for d in pairs)}, identical: {ties}"
    )
    diff = [
        statistics.mean(per_target["gaps"][t][i] - per_target["auto"][t][i] for t in TARGETS)
        for i in range(len(seeds))
    ]
    mean, std = statistics.mean(diff), statistics.stdev(diff)
    t_stat = mean / (std / math.sqrt(len(diff)))
    critical = T_95.get(len(diff), 2.0)
    values = ", ".join(f"{100 * d:+.1f}" for d in diff)
    print(f"over the targets: {values}  → {fmt(diff, 100, '+', 1)}; paired t = {t_stat:.2f}")
    verdict = (
        f"{'gaps' if mean > 0 else 'auto'} is better beyond the seed spread"
        if abs(t_stat) > critical
        else "neither rule is better beyond the seed spread"
    )
    print(
        f"{verdict} (|t| {'>' if abs(t_stat) > critical else '≤'} {critical}, 95 %, "
        f"{len(diff)} seeds)"
    )


def print_merge_ranking(
    by_rule: Runs, stl: dict[str, list[float]], per_target: dict[str, dict[str, list[float]]]
) -> None:
    """The merge-weight ranking's runs (cut auto), where they exist, against STL and `auto`."""
    for target in TARGETS:
        merged = runs("merge", target)
        if not merged:
            continue
        seeds = sorted(merged)
        index = {s: i for i, s in enumerate(sorted(by_rule["auto"][target]))}
        print(f"\nranking merge (Λ_k of one Alg. 2 merge), cut auto, {target}, seeds {seeds}")
        for s in seeds:
            ranking = merged[s]["forkmerge"]["ranking"]
            weights = ", ".join(f"{w:.2f}" for w in ranking["relevance"])
            print(
                f"seed {s}: kept {kept(merged[s]):6} ranking {','.join(ranking['order'])} "
                f"(Λ_k {weights})"
            )
        fm = [test_mae(merged[s], "forkmerge") for s in seeds]
        base = [stl[target][index[s]] for s in seeds]
        delta = relative(base, fm)
        paired = [
            d - per_target["auto"][target][index[s]] for d, s in zip(delta, seeds, strict=True)
        ]
        print(
            f"test MAE {fmt(fm) if len(fm) > 1 else f'{fm[0]:.3f}'}; Δm vs STL "
            + ", ".join(f"{100 * d:+.1f}" for d in delta)
            + (f" → {fmt(delta, 100, '+', 1)}" if len(delta) > 1 else "")
            + " %; paired with auto (pre-pass): "
            + ", ".join(f"{100 * d:+.1f}" for d in paired)
            + (f" → {fmt(paired, 100, '+', 1)} points" if len(paired) > 1 else " points")
        )


def print_costs() -> None:
    """Seconds to rank and of the whole ForkMerge run (ranking included), per rule and target.

    Wall times: they depend on how loaded the machine was when each group of runs ran.
    """
    print("\nseconds: ranking / whole ForkMerge run, per seed (wall time, see RESULTS.md for load)")
    for rule in (*RULES, "merge"):
        for target in TARGETS:
            found = runs(rule, target)
            if not found:
                continue
            cells = ", ".join(
                f"{run['forkmerge']['ranking']['seconds']:.0f} / "
                + f"{next(r['seconds'] for r in run['results'] if r['method'] == 'forkmerge'):.0f}"
                for _, run in sorted(found.items())
            )
            print(f"{rule:5} {target:5}: {cells}")


def main() -> None:
    by_rule = {rule: {t: runs(rule, t) for t in TARGETS} for rule in RULES}
    seeds = sorted(set.intersection(*(set(by_rule[r][t]) for r in RULES for t in TARGETS)))
    print(f"seeds {seeds}; targets {', '.join(TARGETS)}")
    stl = print_plans(by_rule, seeds)
    # Δm of each rule per target and seed, then per seed over the targets (the paired unit).
    per_target = {
        r: {
            t: relative(stl[t], [test_mae(by_rule[r][t][s], "forkmerge") for s in seeds])
            for t in TARGETS
        }
        for r in RULES
    }
    per_seed = {
        r: [statistics.mean(per_target[r][t][i] for t in TARGETS) for i in range(len(seeds))]
        for r in RULES
    }
    print_table(by_rule, seeds, stl, per_seed)
    print("\nΔm per target in % (mean ± std over seeds)")
    for r in RULES:
        cells = ", ".join(f"{t} {fmt(per_target[r][t], 100, '+', 1)}" for t in TARGETS)
        print(f"{r:5}: {cells}")
    print_paired(per_target, seeds)
    print_merge_ranking(by_rule, stl, per_target)
    print_costs()


if __name__ == "__main__":
    main()
