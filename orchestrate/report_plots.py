"""The sweep report's PNG plots (matplotlib, Agg backend: files only, no display).

curves.png      each curve (train and eval loss by default) per arm: the mean over seeds at
                the steps every seed logged, with a min–max band over seeds;
metrics.png     each metric per arm: every seed (dots) and the mean ± CI (black);
differences.png each metric's paired difference against the baseline ± CI, with 0 marked:
                the comparison the ablation is about (narrower than the per-arm intervals
                when seeds move both arms alike);
frontier.png    (ablations that name `frontier: [x, y]`) y against x per seed and per arm,
                e.g. reward against KL over PPO's β.
"""

from __future__ import annotations

import math
import pathlib
import statistics
import sys
from collections.abc import Sequence
from typing import Any

from orchestrate.jsonio import read_records
from orchestrate.sweep_files import DEFAULT_CURVES, Metric, series

Values = dict[str, dict[str, dict[int, float]]]  # metric -> arm -> seed -> value


def curve_band(
    runs: dict[int, pathlib.Path], spec: dict[str, Any]
) -> tuple[list, list, list, list]:
    """Steps every seed logged, with the mean, min and max over seeds at each."""
    file = spec.get("file", "metrics.jsonl")
    per_seed = [dict(series(read_records(d / file), spec["key"])) for d in runs.values()]
    per_seed = [s for s in per_seed if s]
    if not per_seed:
        return [], [], [], []
    steps = sorted(set.intersection(*(set(s) for s in per_seed)))
    mean = [statistics.fmean(s[t] for s in per_seed) for t in steps]
    low = [min(s[t] for s in per_seed) for t in steps]
    high = [max(s[t] for s in per_seed) for t in steps]
    return steps, mean, low, high


def _finite(x: float) -> float:
    return x if math.isfinite(x) else 0.0


def _grid(plt: Any, count: int, width: float = 4.5, height: float = 3.8) -> tuple[Any, list]:
    cols = min(3, count)
    rows = -(-count // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in list(axes.flat)[count:]:
        ax.axis("off")
    return fig, list(axes.flat)[:count]


def plot_curves(plt: Any, runs: dict, curves: Sequence[dict], colors: dict) -> Any:
    fig, axes = _grid(plt, len(curves), width=6.0, height=4.2)
    for ax, curve in zip(axes, curves, strict=True):
        label = curve.get("label", curve["key"])
        for arm, seeds in runs.items():
            steps, mean, low, high = curve_band(seeds, curve)
            if steps:
                ax.plot(steps, mean, color=colors[arm], label=f"{arm} (n={len(seeds)})")
                ax.fill_between(steps, low, high, color=colors[arm], alpha=0.2, linewidth=0)
        ax.set(xlabel="step", ylabel=label, title=f"{label}: mean over seeds, band = min–max")
        ax.grid(alpha=0.3)
        ax.legend()
    return fig


def plot_metrics(
    plt: Any, values: Values, summary: dict, shown: Sequence[Metric], colors: dict
) -> Any:
    fig, axes = _grid(plt, len(shown))
    arms = list(colors)
    for ax, metric in zip(axes, shown, strict=True):
        for i, arm in enumerate(arms):
            seeds = [v for v in values[metric.name][arm].values() if math.isfinite(v)]
            row = summary["metrics"][metric.name][arm]
            xs = [i + 0.08 * (j - (len(seeds) - 1) / 2) for j in range(len(seeds))]
            ax.scatter(xs, seeds, color=colors[arm], alpha=0.6, s=16)
            if row["n"]:
                ax.errorbar(
                    [i], [row["mean"]], yerr=[_finite(row["ci"])], fmt="o", color="black", capsize=5
                )
        ax.set_xticks(range(len(arms)), arms, rotation=20 if len(arms) > 3 else 0)
        ax.set_title(metric.label)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"each seed (dots) and mean ± {summary['level']:.0%} CI (black)")
    return fig


def plot_differences(plt: Any, summary: dict, shown: Sequence[Metric], colors: dict) -> Any:
    base = summary["baseline"]
    arms = [a for a in colors if a != base]
    fig, axes = _grid(plt, len(shown))
    for ax, metric in zip(axes, shown, strict=True):
        for i, arm in enumerate(arms):
            row = summary["metrics"][metric.name][arm]
            if row.get("diff_n"):
                ax.errorbar(
                    [i],
                    [row["diff"]],
                    yerr=[_finite(row["diff_ci"])],
                    fmt="o",
                    color=colors[arm],
                    capsize=5,
                )
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(arms)), arms, rotation=20 if len(arms) > 3 else 0)
        ax.set_title(f"Δ {metric.label}")
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"paired difference vs {base} (same seed), mean ± {summary['level']:.0%} CI")
    return fig


def plot_frontier(
    plt: Any, values: Values, summary: dict, x: Metric, y: Metric, colors: dict
) -> Any:
    fig, ax = plt.subplots(figsize=(6.5, 4.8))
    for arm in colors:
        xs, ys = values[x.name][arm], values[y.name][arm]
        seeds = sorted(set(xs) & set(ys))
        ax.scatter([xs[s] for s in seeds], [ys[s] for s in seeds], color=colors[arm], alpha=0.35)
        mx, my = summary["metrics"][x.name][arm], summary["metrics"][y.name][arm]
        if mx["n"] and my["n"]:
            ax.errorbar(
                mx["mean"],
                my["mean"],
                xerr=_finite(mx["ci"]),
                yerr=_finite(my["ci"]),
                fmt="o",
                color=colors[arm],
                capsize=4,
                label=arm,
            )
    ax.set(xlabel=x.label, ylabel=y.label, title="each seed (faint) and arm mean ± CI")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def plot_all(
    out_dir: pathlib.Path,
    runs: dict[str, dict[int, pathlib.Path]],
    values: Values,
    summary: dict[str, Any],
    metrics: Sequence[Metric],
    spec: dict[str, Any],
) -> list[pathlib.Path]:
    """Write the plots that have data; returns their paths."""
    try:
        import matplotlib
    except ImportError:
        print("flaxlm report: matplotlib is not installed; no plots", file=sys.stderr)
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    colors = {arm: plt.get_cmap("tab10")(i % 10) for i, arm in enumerate(runs)}
    figures = {}
    curves = [
        c
        for c in spec.get("curves", DEFAULT_CURVES)
        if any(curve_band(r, c)[0] for r in runs.values())
    ]
    if curves:
        figures["curves"] = plot_curves(plt, runs, curves, colors)
    shown = [
        m
        for m in metrics
        if any(math.isfinite(v) for a in values[m.name].values() for v in a.values())
    ]
    if shown:
        figures["metrics"] = plot_metrics(plt, values, summary, shown, colors)
        if len(runs) > 1:
            figures["differences"] = plot_differences(plt, summary, shown, colors)
    if spec.get("frontier"):
        by_name = {m.name: m for m in metrics}
        x, y = (by_name[name] for name in spec["frontier"])
        figures["frontier"] = plot_frontier(plt, values, summary, x, y, colors)
    written = []
    for name, fig in figures.items():
        fig.tight_layout()
        fig.savefig(out_dir / f"{name}.png", dpi=110)
        plt.close(fig)
        written.append(out_dir / f"{name}.png")
    return written
