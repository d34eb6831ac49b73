"""A sweep directory's files and the numbers a report reads from its runs: the plan and
run record names, metric series from metrics.jsonl, the metrics and curves it knows."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

RUN_FILE = "sweep_run.json"
PLAN_FILE = "sweep.json"


@dataclasses.dataclass(frozen=True)
class Metric:
    """One number per run: `reduce` over the values of `key` in `file` (a .jsonl of records
    or a .json summary; dotted keys reach into nested dicts)."""

    name: str
    label: str
    key: str
    file: str = "metrics.jsonl"
    reduce: str = "last"  # last | min | max | median | tail (mean of the last 10%, >= 1)
    positive_only: bool = False  # tokens_per_sec is 0 on the window that compiled


REDUCTIONS = ("last", "min", "max", "median", "tail")
METRICS = {
    m.name: m
    for m in (
        Metric("final_eval_loss", "final eval loss", "eval_loss"),
        Metric("best_eval_loss", "best eval loss", "eval_loss", reduce="min"),
        Metric("final_loss", "final train loss", "loss"),
        Metric("rm_accuracy", "RM pair accuracy", "eval_pair_accuracy"),
        Metric("rm_score", "RM score", "eval_rm_score"),
        Metric("oracle_score", "oracle score", "eval_oracle_score"),
        Metric("kl", "KL to reference (nats)", "eval_kl"),
        Metric(
            "tokens_per_sec",
            "tokens/s (median)",
            "tokens_per_sec",
            "metrics.jsonl",
            "median",
            positive_only=True,
        ),
        Metric("wall_s", "wall time (s)", "wall_s", RUN_FILE),
    )
}
DEFAULT_METRICS = ("final_eval_loss", "best_eval_loss", "tokens_per_sec", "wall_s")
DEFAULT_CURVES = (
    {"key": "loss", "label": "train loss"},
    {"key": "eval_loss", "label": "eval loss"},
)


def lookup(record: dict[str, Any], key: str) -> Any:
    node: Any = record
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def series(records: Sequence[dict[str, Any]], key: str) -> list[tuple[int, float]]:
    """(step, value) of every record holding a number (or 'nan'/'inf' text) under key."""
    out = []
    for record in records:
        value = lookup(record, key)
        if isinstance(value, str):
            try:
                value = float(value)  # metrics.jsonl writes non-finite numbers as text
            except ValueError:
                continue
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out.append((int(record.get("step", 0)), float(value)))
    return out
