"""Δm over STL of ForkMerge with two cut rules on QM9, from `compare-methods` outputs.

Reads <rule>-<target>-s<seed>/methods.json beside this file (one `compare-methods --seeds 1` run per
seed, from a copy of studies/qm9.toml with `[study] seed` set, so the seeds run in parallel): the
`gaps` runs hold STL and ForkMerge with the older rule, the `auto` runs ForkMerge with the new
default; the same seeds, so the same STL and the same pre-pass ranking. Δm per target and seed =
(STL − ForkMerge) / STL on the test MAE (Appendix C.1, lower is better), averaged over seeds,
then over targets (as `compare-methods` does).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).parent
TARGETS = [t for t in sys.argv[1:]] or ["mu", "homo", "lumo"]


def runs(rule: str, target: str) -> dict[int, dict]:
    found = {}
    for path in sorted(HERE.glob(f"{rule}-{target}-s*/methods.json")):
        for run in json.loads(path.read_text())["runs"]:
            found[run["seed"]] = run
    return found


def test_mae(run: dict, method: str) -> float:
    return next(r["target_test"] for r in run["results"] if r["method"] == method)


def fmt(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def main() -> None:
    rows: dict[str, dict[str, list[float]]] = {"STL": {}, "gaps": {}, "auto": {}}
    delta: dict[str, list[float]] = {"gaps": [], "auto": []}
    for target in TARGETS:
        gaps, auto = runs("gaps", target), runs("auto", target)
        seeds = sorted(set(gaps) & set(auto))
        stl = [test_mae(gaps[s], "stl") for s in seeds]
        rows["STL"][target] = stl
        for rule, by_seed in (("gaps", gaps), ("auto", auto)):
            fm = [test_mae(by_seed[s], "forkmerge") for s in seeds]
            rows[rule][target] = fm
            delta[rule].append(statistics.mean((b - m) / b for b, m in zip(stl, fm, strict=True)))
            for s in seeds:
                plan = by_seed[s]["forkmerge"]
                names = ", ".join(plan["branches"])
                order = ",".join(plan["ranking"]["order"])
                print(f"{rule:5} {target:5} seed {s}: {names}  (ranking {order})")
        same = all(
            gaps[s]["forkmerge"]["ranking"]["order"] == auto[s]["forkmerge"]["ranking"]["order"]
            for s in seeds
        )
        print(f"{target}: same pre-pass ranking under both rules: {same}")
    print("| method | " + " | ".join(TARGETS) + " | Δm |")
    for name, per_target in rows.items():
        cells = [fmt(per_target[t]) for t in TARGETS]
        dm = "0" if name == "STL" else f"{100 * statistics.mean(delta[name]):+.1f} %"
        print(f"| {name} | " + " | ".join(cells) + f" | {dm} |")


if __name__ == "__main__":
    main()
