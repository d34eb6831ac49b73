"""The pipeline's final report: DIR/report.md, DIR/report/*.png and DIR/summary.json.

Every training figure is read from the stages' metrics.jsonl (the last logged value of a
key, or its last eval line). The held-out comparison of policies is measured here: each
policy (SFT, and PPO / DPO / GRPO when they ran) answers the held-out prompts
(`report.eval_samples` samples per prompt at temperature 1, the policy as trained, plus
one greedy answer), and the task's oracle scores the answers. DIR/summary.json holds
the headline figures, and DIR/metrics.jsonl repeats them as one line so sweeps read a
pipeline run like any other run.
"""

from __future__ import annotations

import json
import math
import pathlib
import sys
from typing import Any

import ml_collections
import numpy as np

from rlhf.tasks import load_task
from train.metrics import read_metrics
from train.pipeline_stages import data_paths, read_prompts

POLICY_STAGES = ("sft", "ppo", "dpo", "grpo")


def last(rows: list[dict], key: str) -> float | None:
    """The last logged value of `key` (None when never logged)."""
    values = [r[key] for r in rows if key in r]
    return float(values[-1]) if values else None


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pairs = [(int(r["step"]), float(r[key])) for r in rows if key in r]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def stage_metrics(workdir: pathlib.Path) -> dict[str, list[dict]]:
    out = {}
    for stage in ("pretrain", "sft", "reward", "ppo", "dpo", "grpo"):
        path = workdir / stage / "metrics.jsonl"
        if path.is_file():
            out[stage] = read_metrics(workdir / stage)
    return out


# Per stage: (label, metrics key) of the figures in the table.
KEY_FIGURES = {
    "pretrain": (("final train loss", "loss"), ("tokens/s", "tokens_per_sec")),
    "sft": (("final train loss", "loss"), ("held-out loss", "eval_loss")),
    "reward": (
        ("held-out pairwise accuracy vs oracle", "eval_pair_accuracy"),
        ("held-out Kendall τ", "eval_kendall_tau"),
        ("final train loss", "loss"),
    ),
    "ppo": (
        ("RM score (last iteration)", "rm_score"),
        ("KL to SFT, nats/response", "kl"),
        ("oracle score (last iteration)", "oracle_score"),
        ("held-out oracle score", "eval_oracle_score"),
    ),
    "dpo": (("reward accuracy", "reward_accuracy"), ("held-out oracle score", "eval_oracle_score")),
    "grpo": (("RM score (last iteration)", "rm_score"), ("KL to SFT", "kl")),
}
PLOTS = {
    "pretrain": ("loss",),
    "sft": ("loss", "eval_loss"),
    "reward": ("loss", "eval_pair_accuracy"),
    "ppo": ("rm_score", "kl", "oracle_score", "eval_oracle_score"),
    "dpo": ("loss", "reward_accuracy"),
    "grpo": ("rm_score", "kl", "oracle_score"),
}


def plot_stage(stage: str, rows: list[dict], out: pathlib.Path) -> pathlib.Path | None:
    """One PNG per stage, a panel per metric; None when nothing was logged."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    keys = [k for k in PLOTS[stage] if any(k in r for r in rows)]
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        steps, values = series(rows, key)
        ax.plot(steps, values, marker="o" if len(steps) < 20 else None, markersize=3)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(stage)
    fig.tight_layout()
    path = out / f"{stage}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- held-out eval


def oracle_matrix(task: Any, prompts: list[str], groups: list[list[str]]) -> np.ndarray:
    """Oracle scores [prompts, samples] of each prompt's responses."""
    return np.array(
        [[task.score(p, r) for r in group] for p, group in zip(prompts, groups, strict=True)]
    )


def evaluate_policies(
    config: ml_collections.ConfigDict, workdir: pathlib.Path
) -> tuple[dict[str, dict], list[str], dict[str, list[str]]]:
    """Oracle scores of each policy on the held-out prompts; greedy answers per policy."""
    import jax

    from model.generate import SamplingConfig
    from rlhf import rm_data
    from rlhf import rollout as ro
    from train.sample import Policy

    task = load_task(config.task)
    prompts = read_prompts(data_paths(workdir)["eval_prompts"])
    key = jax.random.fold_in(jax.random.key(config.seed), 11)
    results, greedy_answers = {}, {}
    for stage in POLICY_STAGES:
        if not (workdir / stage / "checkpoints").is_dir():
            continue
        policy = Policy(str(workdir / stage))
        answers = {}
        for name, temperature, k in (
            ("sampled", 1.0, config.report.eval_samples),
            ("greedy", 0.0, 1),
        ):
            sampling = ro.sampling_for(
                SamplingConfig(temperature=temperature),
                policy.config.vocab_size,
                policy.tokenizer,
            )
            answers[name] = rm_data.sample_groups(
                policy.model,
                policy.params,
                policy.tokenizer,
                prompts,
                k,
                key,  # the same key for every policy: paired samples
                prompt_len=config.ppo.seq_len,
                max_new_tokens=config.ppo.ppo.max_new_tokens,
                sampling=sampling,
                batch_size=config.rm_data.batch_size,
                mesh=policy.mesh,
                rules=policy.rules,
                desc=f"report: {stage} {name}",
            )
        scores = {name: oracle_matrix(task, prompts, groups) for name, groups in answers.items()}
        results[stage] = {f"oracle_{name}": float(s.mean()) for name, s in scores.items()}
        results[stage]["exact_greedy"] = float(np.mean(scores["greedy"] == 1.0))
        greedy_answers[stage] = [g[0] for g in answers["greedy"]]
    return results, prompts, greedy_answers


# ----------------------------------------------------------------------------- the report


def fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:,.4g}"
    return str(value)


def md_table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return lines


def build_summary(
    metrics: dict[str, list[dict]], policies: dict[str, dict], rm_summary: dict
) -> dict[str, float]:
    summary: dict[str, float] = {}
    for stage, figures in KEY_FIGURES.items():
        for _, key in figures:
            value = last(metrics.get(stage, []), key)
            if value is not None:
                summary[f"{stage}_{key}"] = value
    for stage, figures in policies.items():
        summary |= {f"{stage}_{k}": v for k, v in figures.items()}
    if "ranked" in rm_summary:
        summary["labeler_agreement"] = rm_summary["ranked"]["labeler_agreement"]
    if "sft" in policies:
        for stage in POLICY_STAGES[1:]:
            if stage in policies:
                gain = policies[stage]["oracle_sampled"] - policies["sft"]["oracle_sampled"]
                summary[f"{stage}_oracle_gain"] = gain
    return summary


def run(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> int:
    from train.pipeline import STATE_FILE, write_json_atomic

    metrics = stage_metrics(workdir)
    state = json.loads((workdir / STATE_FILE).read_text())
    rm_path = data_paths(workdir)["rm_summary"]
    rm_summary = json.loads(rm_path.read_text()) if rm_path.is_file() else {}
    policies, prompts, greedy = evaluate_policies(config, workdir)
    out = workdir / "report"
    out.mkdir(exist_ok=True)
    plots = {s: plot_stage(s, rows, out) for s, rows in metrics.items()}

    lines = [f"# Pipeline report: task `{config.task}`, seed {config.seed}", ""]
    lines += ["## Time per stage", ""]
    from configs.pipeline import ALL_STAGES

    timings = [[s, state["stages"][s].get("seconds")] for s in ALL_STAGES if s in state["stages"]]
    total = sum(t[1] or 0.0 for t in timings)
    lines += md_table(["stage", "seconds"], [*timings, ["total (before the report)", total]])
    lines += ["", "## Key figures (from each stage's metrics.jsonl)", ""]
    rows = []
    for stage, figures in KEY_FIGURES.items():
        for label, key in figures:
            value = last(metrics.get(stage, []), key)
            if value is not None:
                rows.append([stage, label, f"`{key}`", value])
    lines += md_table(["stage", "figure", "key", "value"], rows)
    if rm_summary:
        lines += ["", "## Reward-model data (rm_data/summary.json)", ""]
        lines += md_table(
            ["file", "groups", "all-tied groups dropped", "labeler–oracle agreement", "pairs"],
            [
                [name, s["groups"], s["dropped_all_tied"], s["labeler_agreement"], s["pairs"]]
                for name, s in rm_summary.items()
            ],
        )
    lines += ["", f"## Policies on the {len(prompts)} held-out prompts (oracle score, 0-1)", ""]
    lines += md_table(
        [
            "policy",
            f"mean oracle, {config.report.eval_samples} samples/prompt at T=1",
            "mean oracle, greedy",
            "greedy exactly right",
        ],
        [
            [s, p["oracle_sampled"], p["oracle_greedy"], p["exact_greedy"]]
            for s, p in policies.items()
        ],
    )
    lines += ["", "## Curves", ""]
    lines += [f"![{s}](report/{p.name})" for s, p in plots.items() if p is not None]
    task = load_task(config.task)
    n = min(config.report.num_samples, len(prompts))
    lines += ["", f"## Greedy answers to the first {n} held-out prompts (oracle score)", ""]
    names = list(greedy)
    lines += md_table(
        ["prompt", *names],
        [
            [f"`{prompts[i]}`"]
            + [f"`{greedy[s][i]}` ({task.score(prompts[i], greedy[s][i]):.2f})" for s in names]
            for i in range(n)
        ],
    )
    summary = build_summary(metrics, policies, rm_summary)
    write_json_atomic(workdir / "summary.json", summary)
    (workdir / "metrics.jsonl").write_text(json.dumps({"step": 0, **summary}) + "\n")
    (workdir / "report.md").write_text("\n".join(lines) + "\n")
    print(f"report: {workdir / 'report.md'}", file=sys.stderr)
    for stage in POLICY_STAGES:
        if stage in policies:
            print(f"  {stage}: held-out oracle score {policies[stage]['oracle_sampled']:.3f}")
    return 0
