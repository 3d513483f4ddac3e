"""Pictures of a ForkMerge run: the Λ trajectory (as the paper's Figure 9) and, for three
branches, every merge's inner trials on the simplex.

Plain data in, files out; no MLflow. Figures are drawn on :class:`matplotlib.figure.Figure`
directly (Agg canvas), so no pyplot state or GUI backend is ever touched.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class MergeRecord:
    """What the pictures need from one merge."""

    round: int
    step: int
    weights: tuple[float, ...]
    score: float
    # (Λ, score, source) of every candidate the inner study saw, in order.
    trials: tuple[tuple[tuple[float, ...], float, str], ...] = field(default=())


def lambda_csv(branches: Sequence[str], merges: Sequence[MergeRecord]) -> str:
    """One row per merge: round, step, Λ per branch, merged validation score."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["round", "step", *(f"lambda/{b}" for b in branches), "score"])
    for merge in merges:
        writer.writerow([merge.round, merge.step, *merge.weights, merge.score])
    return out.getvalue()


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # Fixed margins rather than a layout engine: constrained layout doubled the drawing time,
    # which is paid at the end of every tracked run.
    figure = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(figure)
    return figure


def plot_lambda_trajectory(
    branches: Sequence[str], merges: Sequence[MergeRecord], path: Path, *, title: str = ""
) -> None:
    """Stacked areas of Λ over training steps: the share each branch gets at every merge."""
    # Compact (about 790 × 290 px): it heads the run's description, above the Λ table.
    figure = _figure(7.2, 2.6)
    figure.subplots_adjust(left=0.08, right=0.74, bottom=0.19, top=0.87)
    ax = figure.add_subplot()
    steps = [m.step for m in merges]
    weights = np.array([m.weights for m in merges], dtype=float).T  # branch × merge
    colours = _colours(len(branches))
    if len(merges) == 1:  # a single merge has no width: draw it as a stacked bar
        bottom = 0.0
        for name, value, colour in zip(branches, weights[:, 0], colours, strict=True):
            ax.bar([steps[0]], [value], bottom=bottom, color=colour, label=name, width=1.0)
            bottom += value
    else:
        ax.stackplot(steps, weights, labels=list(branches), colors=colours, alpha=0.9)
    ax.set_xlim(min(steps) if len(steps) > 1 else steps[0] - 1, max(steps) + (len(steps) == 1))
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("training step (merge)")
    # Upright: a rotated "Λ" reads as "<".
    ax.set_ylabel("Λ", rotation=0, labelpad=10, va="center", fontsize=13)
    ax.set_title(f"Merge weights Λ · {title}" if title else "Merge weights Λ", fontsize=10)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small", title="branch")
    figure.savefig(path)


# Vertices of the 2-simplex drawn as an equilateral triangle.
_CORNERS = np.array([[0.0, 0.0], [1.0, 0.0], [0.5, math.sqrt(3) / 2]])


def _ternary(weights: Sequence[Sequence[float]]) -> np.ndarray:
    return np.asarray(weights, dtype=float).reshape(-1, 3) @ _CORNERS


def plot_simplex_trials(
    branches: Sequence[str], merges: Sequence[MergeRecord], path: Path, *, max_panels: int = 16
) -> None:
    """One ternary panel per merge: inner trials coloured by score, the chosen Λ starred.

    Colours are normalised within each merge (0 = its worst finite score, 1 = its best), since
    scores drift over training; failed (non-finite) trials are grey crosses.
    """
    if len(branches) != 3:
        raise ValueError(f"a simplex scatter needs exactly 3 branches, got {len(branches)}")
    shown = list(merges)
    if len(shown) > max_panels:  # keep the first, the last and evenly spaced merges between
        picks = np.linspace(0, len(shown) - 1, max_panels).round().astype(int)
        shown = [shown[i] for i in sorted(set(picks.tolist()))]
    columns = min(2, len(shown))  # two panels a row stay legible at the artifact preview width
    rows = math.ceil(len(shown) / columns)
    width, height = 2.6 * columns + 1.0, 2.5 * rows + 0.5
    figure = _figure(width, height)
    # Panels on the left, a colour bar in the last inch on the right, the title on top.
    figure.subplots_adjust(
        left=0.02, right=1 - 1.0 / width, bottom=0.02, top=1 - 0.5 / height, wspace=0.05
    )
    axes = figure.subplots(rows, columns, squeeze=False)
    scatter = None
    for ax, merge in zip(axes.flat, shown, strict=False):
        ax.fill(*_CORNERS.T, facecolor="none", edgecolor="0.4", linewidth=0.8)
        # Bottom labels grow inwards from their corner so neighbouring panels never overlap.
        for corner, name, align, offset in zip(
            _CORNERS,
            branches,
            (("left", "top"), ("right", "top"), ("center", "bottom")),
            ((0, -3), (0, -3), (0, 3)),
            strict=True,
        ):
            ax.annotate(
                name,
                corner,
                xytext=offset,
                textcoords="offset points",
                ha=align[0],
                va=align[1],
                fontsize=7,
                color="0.25",
            )
        points = [t for t in merge.trials if math.isfinite(t[1])]
        failed = [t for t in merge.trials if not math.isfinite(t[1])]
        if points:
            scores = np.array([t[1] for t in points])
            span = scores.max() - scores.min()
            shade = (scores - scores.min()) / span if span > 0 else np.ones_like(scores)
            xy = _ternary([t[0] for t in points])
            scatter = ax.scatter(
                xy[:, 0], xy[:, 1], c=shade, cmap="viridis", vmin=0, vmax=1, s=18,
                edgecolors="0.2", linewidths=0.3,
            )  # fmt: skip
        if failed:
            xy = _ternary([t[0] for t in failed])
            ax.scatter(xy[:, 0], xy[:, 1], marker="x", color="0.6", s=16)
        chosen = _ternary([merge.weights])[0]
        ax.scatter(*chosen, marker="*", s=140, color="crimson", edgecolors="white", linewidths=0.6)
        ax.set_title(f"round {merge.round} · step {merge.step}", fontsize=8)
        ax.set_aspect("equal")
        ax.set_xlim(-0.12, 1.12)
        ax.set_ylim(-0.1, 0.98)
        ax.axis("off")
    for ax in list(axes.flat)[len(shown) :]:
        ax.axis("off")
    if scatter is not None:
        slot = figure.add_axes((1 - 0.75 / width, 0.15, 0.15 / width, 0.7))
        bar = figure.colorbar(scatter, cax=slot)
        bar.set_label("score within the merge (0 worst, 1 best)", fontsize=8)
    figure.suptitle("Inner-study trials on the simplex (★ chosen Λ)", fontsize=10)
    figure.savefig(path)


def _colours(n: int) -> list[Any]:
    from matplotlib import colormaps

    palette = colormaps["tab10" if n <= 10 else "tab20"]
    return [palette(i % palette.N) for i in range(n)]
