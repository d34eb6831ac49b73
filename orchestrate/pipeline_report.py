"""The pipeline's final report: DIR/report.md, DIR/report/*.png and DIR/summary.json.

Every training figure is read from the stages' metrics.jsonl (the last logged value of a
key, or its last eval line). The held-out comparison of policies is measured here: each
policy (SFT, and PPO / DPO / GRPO when they ran) answers the held-out prompts
(`report.eval_samples` samples per prompt at temperature 1, the policy as trained, plus
one greedy answer), and the task's oracle scores the answers. Each stage is then checked
against its target (orchestrate/pipeline_checks.py: SFT at the teacher's level, the
reward model's accuracy, the gap PPO / GRPO / DPO close) with the reason when it fell
short. DIR/summary.json holds the headline figures, and DIR/metrics.jsonl repeats them
as one line so sweeps read a pipeline run like any other run.
"""

from __future__ import annotations

import json
import math
import pathlib
import sys
from typing import Any

import ml_collections
import numpy as np

from configs.stages import PIPELINE_ORDER, TRAINING
from configs.stages import POLICIES as POLICY_STAGES
from orchestrate import pipeline_checks as checks
from orchestrate.jsonio import write_json_atomic
from orchestrate.workdir import STATE_FILE, data_paths, read_prompts, start_policy
from rlhf.tasks import load_task
from train.metrics import read_metrics


def policy_dir(
    config: ml_collections.ConfigDict, workdir: pathlib.Path, stage: str
) -> pathlib.Path:
    """A policy stage's run directory; "sft" is the policy RL started from (the base model
    when a pipeline with `init_from` ran no SFT), "base" the base model itself."""
    if stage == "base":
        return pathlib.Path(config.init_from)
    return start_policy(config, workdir) if stage == "sft" else workdir / stage


def compared_policies(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> list[str]:
    """The policies the report compares: each stage that wrote a checkpoint, and "base",
    the imported model before SFT, when SFT ran on top of one (the gain SFT itself made)."""
    stages = [s for s in POLICY_STAGES if (policy_dir(config, workdir, s) / "checkpoints").is_dir()]
    trained_sft = config.init_from and start_policy(config, workdir) == workdir / "sft"
    return ["base", *stages] if trained_sft else stages


def last(rows: list[dict], key: str) -> float | None:
    """The last logged value of `key` (None when never logged)."""
    values = [r[key] for r in rows if key in r]
    return float(values[-1]) if values else None


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pairs = [(int(r["step"]), float(r[key])) for r in rows if key in r]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def stage_metrics(workdir: pathlib.Path) -> dict[str, list[dict]]:
    out = {}
    for stage in TRAINING:
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
    "ppo_oracle": (
        ("oracle score (last iteration)", "oracle_score"),
        ("KL to SFT, nats/response", "kl"),
    ),
    "dpo": (("reward accuracy", "reward_accuracy"), ("held-out oracle score", "eval_oracle_score")),
    "grpo": (("RM score (last iteration)", "rm_score"), ("KL to SFT", "kl")),
}
PLOTS = {
    "pretrain": ("loss",),
    "sft": ("loss", "eval_loss"),
    "reward": ("loss", "eval_pair_accuracy"),
    "ppo": ("rm_score", "kl", "oracle_score", "eval_oracle_score"),
    "ppo_oracle": ("oracle_score", "kl", "eval_oracle_score"),
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


def sample_answers(
    config: ml_collections.ConfigDict,
    workdir: pathlib.Path,
    stage: str,
    prompts: list[str],
    temperature: float,
    k: int,
) -> list[list[str]]:
    """k answers per prompt from a stage's policy (the same key for every policy)."""
    import jax

    from model.generate import SamplingConfig
    from rlhf import rm_data
    from rlhf import rollout as ro
    from train.sample import Policy

    policy = Policy(str(policy_dir(config, workdir, stage)))
    sampling = ro.sampling_for(
        SamplingConfig(temperature=temperature), policy.config.vocab_size, policy.tokenizer
    )
    return rm_data.sample_groups(
        policy.model,
        policy.params,
        policy.tokenizer,
        prompts,
        k,
        jax.random.fold_in(jax.random.key(config.seed), 11),
        prompt_len=config.ppo.seq_len,
        max_new_tokens=config.ppo.ppo.max_new_tokens,
        sampling=sampling,
        batch_size=config.rm_data.batch_size,
        mesh=policy.mesh,
        rules=policy.rules,
        desc=f"report: {stage} T={temperature}",
    )


def rlhf_eval(
    config: ml_collections.ConfigDict, workdir: pathlib.Path, stages: list[str]
) -> dict[str, Any] | None:
    """`flaxlm rlhf-eval` (rlhf/evaluate_cli.py) on the held-out prompts, or None without a
    calibrated reward model."""
    from rlhf import evaluate_cli
    from train.reward import CALIBRATION_FILE

    if not (workdir / "reward" / CALIBRATION_FILE).is_file():
        return None
    argv = ["--sft", str(start_policy(config, workdir)), "--reward", str(workdir / "reward")]
    for stage in stages:
        argv += ["--policy", str(policy_dir(config, workdir, stage))]
    argv += ["--prompts", str(data_paths(workdir)["eval_prompts"]), "--task", config.task]
    argv += ["--n", str(config.report.eval_samples), "--seed", str(config.seed)]
    argv += ["--max-new-tokens", str(config.ppo.ppo.max_new_tokens)]
    result = evaluate_cli.run(evaluate_cli.parse_args(argv))
    print(evaluate_cli.table(result), file=sys.stderr)
    return result


def evaluate_policies(
    config: ml_collections.ConfigDict, workdir: pathlib.Path
) -> tuple[dict[str, dict], dict | None, list[str], dict[str, list[str]]]:
    """Per policy on the held-out prompts: the rlhf-eval figures (oracle, RM score, KL to
    SFT, RM accuracy against the oracle on its samples; the oracle score alone when no
    reward model ran) and its greedy answers. Also best-of-n on the SFT samples."""
    task = load_task(config.task)
    prompts = read_prompts(data_paths(workdir)["eval_prompts"])
    stages = compared_policies(config, workdir)
    others = [s for s in stages if s != "sft"]
    evaluated = rlhf_eval(config, workdir, others)
    results: dict[str, dict] = {}
    if evaluated is not None:
        # rlhf-eval's rows: SFT first, then the --policy paths in order.
        for stage, row in zip(["sft", *others], evaluated["policies"], strict=True):
            results[stage] = {
                "oracle_sampled": row["oracle_score"],
                "heldout_rm_score": row["rm_score"],  # not the last-iteration rm_score
                "kl_to_sft": row["kl_to_sft"],
                "rm_accuracy": row.get("rm_pairwise_accuracy"),
            }
    greedy = {}
    for stage in stages:
        if evaluated is None:
            sampled = sample_answers(
                config, workdir, stage, prompts, 1.0, config.report.eval_samples
            )
            results[stage] = {"oracle_sampled": float(oracle_matrix(task, prompts, sampled).mean())}
        greedy[stage] = [g[0] for g in sample_answers(config, workdir, stage, prompts, 0.0, 1)]
        scores = oracle_matrix(task, prompts, [[g] for g in greedy[stage]])
        results[stage] |= {"oracle_greedy": float(scores.mean())}
        results[stage] |= {"exact_greedy": float(np.mean(scores == 1.0))}
    best = None if evaluated is None else evaluated.get("best_of_n")
    return {s: results[s] for s in stages}, best, prompts, greedy  # base, sft, then RL


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
    metrics: dict[str, list[dict]], policies: dict[str, dict], rm_summary: dict, best: dict | None
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
    if best:
        summary["best_of_n_oracle"] = best["rm_chosen_oracle_score"]
        summary["best_of_n_kl"] = best["kl"]
    if "sft" in policies:
        for stage in POLICY_STAGES[1:]:
            if stage in policies:
                gain = policies[stage]["oracle_sampled"] - policies["sft"]["oracle_sampled"]
                summary[f"{stage}_oracle_gain"] = gain
    return summary


def run(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> int:
    metrics = stage_metrics(workdir)
    state = json.loads((workdir / STATE_FILE).read_text())
    rm_path = data_paths(workdir)["rm_summary"]
    rm_summary = json.loads(rm_path.read_text()) if rm_path.is_file() else {}
    policies, best, prompts, greedy = evaluate_policies(config, workdir)
    out = workdir / "report"
    out.mkdir(exist_ok=True)
    plots = {s: plot_stage(s, rows, out) for s, rows in metrics.items()}

    lines = [f"# Pipeline report: task `{config.task}`, seed {config.seed}", ""]
    lines += timing_section(state)
    lines += key_figures_section(metrics)
    lines += rm_data_section(rm_summary)
    lines += policies_section(policies, best, len(prompts), config.report.eval_samples)
    task = load_task(config.task)
    trained_sft = "sft" in policies and "sft" in metrics  # not a base model's row
    teacher = checks.teacher_level(task, prompts, config.seed) if trained_sft else None
    stage_checks = checks.run_checks(policies, metrics, teacher, getattr(task, "max_score", 1.0))
    lines += checks.checks_section(stage_checks)
    lines += ["", "## Curves", ""]
    lines += [f"![{s}](report/{p.name})" for s, p in plots.items() if p is not None]
    lines += greedy_section(task, prompts, greedy, config.report.num_samples)
    summary = build_summary(metrics, policies, rm_summary, best)
    summary |= checks.checks_summary(stage_checks)
    if teacher is not None:
        summary["teacher_oracle"] = teacher
    write_json_atomic(workdir / "summary.json", summary)
    (workdir / "metrics.jsonl").write_text(json.dumps({"step": 0, **summary}) + "\n")
    (workdir / "report.md").write_text("\n".join(lines) + "\n")
    print(f"report: {workdir / 'report.md'}", file=sys.stderr)
    for stage, figures in policies.items():  # base, sft, then RL
        print(f"  {stage}: held-out oracle score {figures['oracle_sampled']:.3f}")
    for c in stage_checks:
        if not c.met:
            print(
                f"  {c.stage} fell short of its target ({c.target}): {c.why}; try {c.to_try}",
                file=sys.stderr,
            )
    return 0


def timing_section(state: dict) -> list[str]:
    """Seconds per finished stage (DIR/pipeline state), in pipeline order, and their sum."""
    lines = ["## Time per stage", ""]
    timings = [
        [s, state["stages"][s].get("seconds")] for s in PIPELINE_ORDER if s in state["stages"]
    ]
    total = sum(t[1] or 0.0 for t in timings)
    return lines + md_table(["stage", "seconds"], [*timings, ["total (before the report)", total]])


def key_figures_section(metrics: dict[str, list[dict]]) -> list[str]:
    lines = ["", "## Key figures (from each stage's metrics.jsonl)", ""]
    rows = []
    for stage, figures in KEY_FIGURES.items():
        for label, key in figures:
            value = last(metrics.get(stage, []), key)
            if value is not None:
                rows.append([stage, label, f"`{key}`", value])
    return lines + md_table(["stage", "figure", "key", "value"], rows)


def rm_data_section(rm_summary: dict) -> list[str]:
    """rm_data's per-file counts; nothing when rm_data did not run."""
    if not rm_summary:
        return []
    lines = ["", "## Reward-model data (rm_data/summary.json)", ""]
    return lines + md_table(
        ["file", "groups", "all-tied groups dropped", "labeler–oracle agreement", "pairs"],
        [
            [name, s["groups"], s["dropped_all_tied"], s["labeler_agreement"], s["pairs"]]
            for name, s in rm_summary.items()
        ],
    )


def policies_section(
    policies: dict[str, dict], best: dict | None, num_prompts: int, eval_samples: int
) -> list[str]:
    """The held-out table of every policy, and best-of-n when a reward model ran."""
    lines = ["", f"## Policies on the {num_prompts} held-out prompts", ""]
    n = eval_samples
    lines += [
        f"Oracle and reward-model scores are means over {n} samples per prompt at T=1 (the same",
        "key for every policy); KL to SFT in nats per response; RM accuracy is the reward",
        "model's pairwise accuracy against the oracle on that policy's own samples.",
    ]
    if "base" in policies:
        lines += ["`base` is the imported model the pipeline started from, before SFT."]
    lines += [""]
    columns = ("oracle_sampled", "heldout_rm_score", "kl_to_sft", "rm_accuracy")
    columns += ("oracle_greedy", "exact_greedy")
    header = ["policy", "oracle", "RM score", "KL to SFT", "RM accuracy"]
    header += ["greedy oracle", "greedy right"]
    lines += md_table(header, [[s, *(p.get(c) for c in columns)] for s, p in policies.items()])
    if best:
        lines += [
            "",
            f"Best-of-{best['n']} on the SFT samples, picked by the reward model: oracle score "
            f"{fmt(best['rm_chosen_oracle_score'])} (picked by the oracle itself: "
            f"{fmt(best['oracle_chosen_oracle_score'])}), analytic KL to SFT {fmt(best['kl'])} "
            "nats (log n − (n−1)/n).",
        ]
    return lines


def table_text(text: str) -> str:
    """`text` for one markdown table cell: line breaks shown as ↵ (a raw one ends the
    row, as in a bulleted answer) and pipes escaped."""
    return text.replace("\r\n", "\n").replace("\n", "↵").replace("|", "\\|")


def greedy_section(
    task: Any, prompts: list[str], greedy: dict[str, list[str]], num_samples: int
) -> list[str]:
    """Side by side, each policy's greedy answer to the first held-out prompts."""
    n = min(num_samples, len(prompts))
    lines = ["", f"## Greedy answers to the first {n} held-out prompts (oracle score)", ""]
    names = list(greedy)
    return lines + md_table(
        ["prompt", *names],
        [
            [f"`{table_text(prompts[i])}`"]
            + [
                f"`{table_text(greedy[s][i])}` ({task.score(prompts[i], greedy[s][i]):.2f})"
                for s in names
            ]
            for i in range(n)
        ],
    )
