"""`flaxlm report DIR`: a sweep's metrics per arm as mean ± 95% CI over seeds, paired
differences against the baseline arm, and PNG plots (written by `flaxlm sweep` at its end).

Intervals use Student's t with n-1 degrees of freedom (n = seeds). The paired difference
of an arm is taken per seed (arm minus baseline on the same seed, hence the same data order
and init seed) over the seeds both finished, so seed-to-seed noise common to both arms
cancels. The t quantile is computed here (regularized incomplete beta + bisection) so the
report needs no scipy; tests check it against scipy.

Outputs: DIR/report.md (also printed), DIR/report.json (unrounded numbers) and
DIR/plots/*.png (orchestrate/report_plots.py; without matplotlib the tables are still written).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import statistics
import sys
from collections.abc import Sequence
from typing import Any

from orchestrate.jsonio import read_json, read_records
from orchestrate.sweep_files import (
    DEFAULT_METRICS,
    METRICS,
    PLAN_FILE,
    REDUCTIONS,
    RUN_FILE,
    Metric,
    series,
)

# ---------------------------------------------------------------- statistics (pure)


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """Lentz's continued fraction for the incomplete beta function (Numerical Recipes 6.4)."""
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def regularized_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    log_front += a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    tail = 0.5 * regularized_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t with df degrees of freedom (bisection on the CDF)."""
    if not 0.0 < p < 1.0 or df <= 0:
        raise ValueError(f"t_quantile(p={p}, df={df}): need 0 < p < 1 and df > 0")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
        if hi - lo <= 1e-13 * hi:
            break
    return 0.5 * (lo + hi)


def mean_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float, int]:
    """(mean, half-width of the two-sided t interval, n); half-width is nan when n < 2."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan, 0
    mean = statistics.fmean(values)
    if n < 2:
        return mean, math.nan, 1
    sem = statistics.stdev(values) / math.sqrt(n)
    return mean, t_quantile(0.5 + level / 2.0, n - 1) * sem, n


def paired_diff(
    arm: dict[int, float], base: dict[int, float], level: float = 0.95
) -> tuple[float, float, int]:
    """mean_ci of arm[s] - base[s] over the seeds s both have (finite values only)."""
    seeds = sorted(s for s in set(arm) & set(base) if math.isfinite(arm[s] - base[s]))
    return mean_ci([arm[s] - base[s] for s in seeds], level)


# ---------------------------------------------------------------- reading runs


def resolve_metric(entry: str | dict[str, Any]) -> Metric:
    """A registry name, or a dict (a registry name plus changes, or a full Metric)."""
    if isinstance(entry, str):
        if entry not in METRICS:
            raise ValueError(f"unknown metric {entry!r}; known: {sorted(METRICS)}")
        return METRICS[entry]
    fields = dict(entry)
    base = METRICS.get(fields["name"])
    if base is None:
        fields.setdefault("label", fields["name"])
    metric = dataclasses.replace(base, **fields) if base else Metric(**fields)
    if metric.reduce not in REDUCTIONS:
        raise ValueError(f"metric {metric.name}: reduce={metric.reduce!r}; use {REDUCTIONS}")
    return metric


def reduce_values(values: Sequence[float], how: str) -> float:
    if not values:
        return math.nan
    if how == "last":
        return values[-1]
    if how == "min":
        return min(values)
    if how == "max":
        return max(values)
    if how == "median":
        return statistics.median(values)
    return statistics.fmean(values[-max(1, len(values) // 10) :])  # tail


def metric_value(directory: pathlib.Path, metric: Metric) -> float:
    values = [v for _, v in series(read_records(directory / metric.file), metric.key)]
    if metric.positive_only:
        values = [v for v in values if v > 0]
    return reduce_values(values, metric.reduce)


def finished_runs(
    sweep_dir: pathlib.Path, plan: dict[str, Any]
) -> dict[str, dict[int, pathlib.Path]]:
    """arm -> seed -> run directory, for the runs whose sweep_run.json says finished."""
    out: dict[str, dict[int, pathlib.Path]] = {arm: {} for arm in plan["arms"]}
    for run in plan["runs"]:
        directory = sweep_dir / run["dir"]
        if (read_json(directory / RUN_FILE) or {}).get("status") == "finished":
            out[run["arm"]][int(run["seed"])] = directory
    return out


def collect(
    runs: dict[str, dict[int, pathlib.Path]], metrics: Sequence[Metric]
) -> dict[str, dict[str, dict[int, float]]]:
    """metric -> arm -> seed -> value."""
    return {
        m.name: {
            arm: {s: metric_value(d, m) for s, d in seeds.items()} for arm, seeds in runs.items()
        }
        for m in metrics
    }


# ---------------------------------------------------------------- summary and markdown


def summarize(
    values: dict[str, dict[str, dict[int, float]]], baseline: str, level: float = 0.95
) -> dict[str, Any]:
    """report.json: per metric and arm the mean/CI over seeds and the paired difference."""
    out: dict[str, Any] = {"baseline": baseline, "level": level, "metrics": {}}
    for name, arms in values.items():
        rows = {}
        for arm, seeds in arms.items():
            finite = [v for _, v in sorted(seeds.items()) if math.isfinite(v)]
            mean, half, n = mean_ci(finite, level)
            row = {
                "mean": mean,
                "ci": half,
                "n": n,
                "values": {str(s): v for s, v in seeds.items()},
            }
            if arm != baseline and baseline in arms:
                d_mean, d_half, d_n = paired_diff(seeds, arms[baseline], level)
                row |= {"diff": d_mean, "diff_ci": d_half, "diff_n": d_n}
            rows[arm] = row
        out["metrics"][name] = rows
    return out


def fmt(x: float) -> str:
    """4 significant digits; thousands separators for large numbers (tokens/s, seconds)."""
    if not math.isfinite(x):
        return "–"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.4g}"


def cell(mean: float, half: float, n: int) -> str:
    """`mean ± half`, both to the decimals of the interval's two significant digits."""
    if n == 0:
        return "–"
    if n < 2 or not math.isfinite(half):
        return f"{fmt(mean)} (n={n})"
    if half <= 1e-9 * max(1.0, abs(mean)):  # no spread (float noise only)
        return f"{fmt(mean)} ± 0"
    decimals = min(8, max(0, 1 - math.floor(math.log10(half))))
    return f"{mean:,.{decimals}f} ± {half:,.{decimals}f}"


def diff_cell(mean: float, half: float, n: int) -> str:
    text = cell(mean, half, n)
    if n >= 2 and math.isfinite(half) and abs(mean) > half:
        text += " *"  # the interval excludes zero
    return text if n == 0 else ("+" if mean > 0 else "") + text


def markdown(summary: dict[str, Any], metrics: Sequence[Metric], arms: Sequence[str]) -> str:
    pct = f"{summary['level']:.0%}"
    heads = [m.label for m in metrics]
    lines = [
        f"Mean ± {pct} confidence interval over seeds (Student t, n-1 degrees of freedom).",
        "",
        "| arm | seeds | " + " | ".join(heads) + " |",
        "|---" * (len(heads) + 2) + "|",
    ]
    for arm in arms:
        rows = [summary["metrics"][m.name][arm] for m in metrics]
        n = max((r["n"] for r in rows), default=0)
        label = f"{arm} (baseline)" if arm == summary["baseline"] else arm
        lines.append(
            f"| {label} | {n} | "
            + " | ".join(cell(r["mean"], r["ci"], r["n"]) for r in rows)
            + " |"
        )
    lines += [
        "",
        f"Paired difference against {summary['baseline']} (arm minus baseline on the same seed), "
        f"mean ± {pct} CI; * marks an interval that excludes 0.",
        "",
        "| arm | " + " | ".join(heads) + " |",
        "|---" * (len(heads) + 1) + "|",
    ]
    for arm in arms:
        if arm == summary["baseline"]:
            continue
        rows = [summary["metrics"][m.name][arm] for m in metrics]
        cells = [
            diff_cell(r.get("diff", math.nan), r.get("diff_ci", math.nan), r.get("diff_n", 0))
            for r in rows
        ]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- entry point


def write_report(
    sweep_dir: pathlib.Path,
    metric_names: Sequence[str] | None = None,
    baseline: str | None = None,
    level: float = 0.95,
    plots: bool = True,
) -> str:
    if not 0.0 < level < 1.0:
        raise ValueError(f"--level {level}: must be in (0, 1)")
    plan = read_json(sweep_dir / PLAN_FILE)
    if plan is None:
        raise FileNotFoundError(
            f"{sweep_dir / PLAN_FILE}: not a sweep directory (run flaxlm sweep)"
        )
    spec = plan.get("spec", {})
    metrics = [resolve_metric(m) for m in (metric_names or spec.get("metrics") or DEFAULT_METRICS)]
    baseline = baseline or plan["baseline"]
    if baseline not in plan["arms"]:
        raise ValueError(f"--baseline {baseline!r} is not an arm; arms are {sorted(plan['arms'])}")
    runs = finished_runs(sweep_dir, plan)
    values = collect(runs, metrics)
    summary = summarize(values, baseline, level)
    (sweep_dir / "report.json").write_text(json.dumps(summary, indent=2) + "\n")
    text = f"# {spec.get('description') or sweep_dir.name}\n\n" + markdown(
        summary, metrics, list(runs)
    )
    if plots:
        if spec.get("frontier") and not set(spec["frontier"]) <= {m.name for m in metrics}:
            raise ValueError(f"frontier {spec['frontier']}: both must be among the metrics")
        from orchestrate import report_plots  # matplotlib: imported only to plot

        images = report_plots.plot_all(sweep_dir / "plots", runs, values, summary, metrics, spec)
        text += "".join(f"\n![{p.stem}](plots/{p.name})\n" for p in images)
    (sweep_dir / "report.md").write_text(text)
    return text


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="flaxlm report", description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", help="a `flaxlm sweep` workdir")
    parser.add_argument("--metrics", default="", help="comma-separated metric names")
    parser.add_argument("--baseline", default="", help="arm to compare against")
    parser.add_argument("--level", type=float, default=0.95, help="confidence level")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    try:
        text = write_report(
            pathlib.Path(args.sweep_dir),
            [m for m in args.metrics.split(",") if m] or None,
            args.baseline or None,
            args.level,
            not args.no_plots,
        )
    except (FileNotFoundError, ValueError, TypeError) as err:
        print(f"flaxlm report: error: {err}", file=sys.stderr)
        return 2
    print(text)
    return 0
