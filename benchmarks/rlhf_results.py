"""The RLHF comparison of docs/rlhf.md: SFT vs PPO vs PPO-with-oracle vs DPO vs GRPO vs
best-of-n, per task and seed, from whole `flaxlm pipeline` runs.

    python benchmarks/rlhf_results.py --task uppercase --seeds 0 1 2 --workdir /tmp/rlhf
    python benchmarks/rlhf_results.py --task next_letter --seeds 0 1 2 --workdir /tmp/rlhf
    python benchmarks/rlhf_results.py --task uppercase --seeds 0 1 2 --workdir /tmp/rlhf \\
        --table-only
    python benchmarks/rlhf_results.py --tasks uppercase next_letter brackets repeat \\
        --seeds 0 1 2 3 4 --workdir /tmp/rlhf --write docs/rlhf.md

Each seed is one pipeline run (configs/pipeline.py:demo with every RL stage, or
`--preset NAME` with that preset's own stages; `--preset smollm2` also needs
`--config.init_from=DIR`, see docs/rlhf.md) in WORKDIR/TASK/seedN; a finished run is
skipped, an interrupted one resumes, and a run that fails is reported and left out while
the others go on (exit 1 at the end). The tables are read from each run's summary.json
(written by the pipeline's report: `flaxlm rlhf-eval` on the held-out prompts, and the
stage checks of orchestrate/pipeline_checks.py). For one task: mean ± sample std over
seeds, and the per-seed values. For the grid (all tasks): per task and method, the mean
with its 95 % t-interval over seeds, the share of the SFT-to-maximum gap closed, how
many seeds met each stage's target, and each run's stage time (pipeline.json); `--write
DOC` puts that table into DOC between the preset's markers (`markers`; a section at the
end when DOC has none). Extra `--config.KEY=VALUE` arguments go to every pipeline run; a
task that needs more data or steps than the preset says so itself (`preset_scale`, which
the pipeline applies: orchestrate/pipeline_sizing.py).
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib
import subprocess
import sys

import numpy as np

from configs import stages
from orchestrate.pipeline_checks import SHORT
from orchestrate.report import cell as ci_cell
from orchestrate.report import mean_ci

ROOT = pathlib.Path(__file__).resolve().parents[1]
STAGES = "data,tokenizer,pretrain,sft,rm_data,reward,ppo,ppo_oracle,dpo,grpo,report"
GRID_BEGIN = "<!-- rlhf_results grid: begin -->"
GRID_END = "<!-- rlhf_results grid: end -->"
# The report's policy rows, after "base": the imported model before SFT (presets that
# start from one).
POLICIES = ("base", *stages.POLICIES)
# The stages orchestrate/pipeline_checks.py sets a target for, in the order tables list them.
TARGET_STAGES = ("sft", "reward", "ppo", "grpo", "dpo")


def markers(preset: str) -> tuple[str, str]:
    """The lines around a preset's grid in a doc: each preset has its own block."""
    if preset == "demo":
        return GRID_BEGIN, GRID_END
    return (
        f"<!-- rlhf_results grid {preset}: begin -->",
        f"<!-- rlhf_results grid {preset}: end -->",
    )


def run_seed(task: str, seed: int, workdir: pathlib.Path, extra: list[str], preset: str) -> int:
    """One pipeline run (resumes a started one); its exit code."""
    command = [sys.executable, "-m", "orchestrate.cli", "pipeline"]
    command += ["--config", f"{ROOT / 'configs' / 'pipeline.py'}:{preset}"]
    command += ["--workdir", str(workdir), f"--config.task={task}", f"--config.seed={seed}"]
    if preset == "demo":  # the demo's defaults leave out DPO, GRPO and PPO with the oracle
        command += [f"--config.stages={STAGES}"]
    print(" ".join(command + extra), flush=True)
    return subprocess.run(command + extra, cwd=ROOT).returncode


def cell(values: list[float | None]) -> str:
    present = [v for v in values if v is not None]
    if not present:
        return "–"
    mean = float(np.mean(present))
    spread = f" ± {np.std(present, ddof=1):.3f}" if len(present) > 1 else ""
    return f"{mean:.3f}{spread} ({', '.join(f'{v:.3f}' for v in present)})"


def table(summaries: list[dict]) -> str:
    """Markdown: a row per policy (oracle, KL to SFT, RM accuracy on its samples), then
    best-of-n and the reward model's held-out accuracy."""
    lines = [
        "| policy | oracle score | KL to SFT (nats) | RM accuracy vs oracle on its samples |",
        "|---|---|---|---|",
    ]
    for name in POLICIES:
        if not any(f"{name}_oracle_sampled" in s for s in summaries):
            continue
        row = [
            cell([s.get(f"{name}_{key}") for s in summaries])
            for key in ("oracle_sampled", "kl_to_sft", "rm_accuracy")
        ]
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    best = [s.get("best_of_n_oracle") for s in summaries]
    kl = [s.get("best_of_n_kl") for s in summaries]
    lines.append(f"| best-of-n (RM picks, SFT samples) | {cell(best)} | {cell(kl)} | – |")
    rm = [s.get("reward_eval_pair_accuracy") for s in summaries]
    lines += [
        "",
        f"Reward model, held-out pairwise accuracy vs the oracle on SFT samples: {cell(rm)}.",
    ]
    return "\n".join(lines + targets_line(summaries))


def targets_line(summaries: list[dict]) -> list[str]:
    """How many seeds met each stage's target (orchestrate/pipeline_checks.py)."""
    stages_met = [(stage, targets_met(summaries, stage)) for stage in TARGET_STAGES]
    counts = [f"{stage} {met}" for stage, met in stages_met if met != "–"]
    return ["", f"Stage targets met (seeds): {', '.join(counts)}."] if counts else []


def interval(values: list[float]) -> str:
    """Mean ± the half-width of its 95 % t-interval (orchestrate/report.py's format)."""
    return ci_cell(*mean_ci(values)) if values else "–"


def best_of_n_kl(values: list[float]) -> str:
    """Best-of-n's KL is the analytic log n - (n - 1) / n: the same n in every run gives one
    value, not an interval."""
    if values and len(set(values)) == 1:
        return f"{values[0]:.3f} (analytic)"
    return interval(values)


def targets_met(summaries: list[dict], stage: str) -> str:
    """The stage's target as met/runs over the runs that checked it; "–" when none did."""
    met = [s[f"{stage}_target_met"] for s in summaries if f"{stage}_target_met" in s]
    return f"{int(sum(met))}/{len(met)}" if met else "–"


def why_short(summaries: list[dict], stage: str) -> str:
    """How many runs fell short of the stage's target for each reason (the report's
    `<stage>_shortfall`), most frequent first; "–" when none did."""
    reasons = [s[f"{stage}_shortfall"] for s in summaries if s.get(f"{stage}_shortfall")]
    ranked = collections.Counter(sorted(reasons)).most_common()  # ties: alphabetical
    return ", ".join(f"{SHORT.get(r, r)} {n}" for r, n in ranked) or "–"


def grid_rows(task: str, summaries: list[dict]) -> list[str]:
    """A task's rows of the grid: one per policy that ran, then the reward model's."""
    rows = []
    for name in POLICIES:
        oracle = [s[f"{name}_oracle_sampled"] for s in summaries if f"{name}_oracle_sampled" in s]
        if not oracle:
            continue
        kl = [s[f"{name}_kl_to_sft"] for s in summaries if s.get(f"{name}_kl_to_sft") is not None]
        closed = [s[f"{name}_gap_closed"] for s in summaries if f"{name}_gap_closed" in s]
        cells = [interval(oracle), interval(kl), interval(closed) if closed else "–"]
        cells.append(targets_met(summaries, name))
        cells.append(why_short(summaries, name))
        rows.append(f"| {task} | {name} | " + " | ".join(cells) + " |")
    best = [s["best_of_n_oracle"] for s in summaries if "best_of_n_oracle" in s]
    if best:
        kl = best_of_n_kl([s["best_of_n_kl"] for s in summaries if "best_of_n_kl" in s])
        rows.append(
            f"| {task} | best-of-n of SFT (RM picks) | {interval(best)} | {kl} | – | – | – |"
        )
    rm = [s["reward_eval_pair_accuracy"] for s in summaries if "reward_eval_pair_accuracy" in s]
    if rm:
        target, why = targets_met(summaries, "reward"), why_short(summaries, "reward")
        rows.append(
            f"| {task} | reward model (pairwise accuracy) | {interval(rm)} | – | – | {target} "
            f"| {why} |"
        )
    return rows


def stage_minutes(run: pathlib.Path) -> float | None:
    """The run's summed stage times (pipeline.json), in minutes."""
    path = run / "pipeline.json"
    if not path.is_file():
        return None
    stages_run = json.loads(path.read_text()).get("stages", {}).values()
    return sum(s.get("seconds", 0.0) for s in stages_run) / 60


def times_line(minutes: dict[str, list[float]]) -> list[str]:
    """Each task's stage time per run, in minutes, as measured (the machine's load varies)."""
    cells = [
        f"{task} {', '.join(f'{m:.1f}' for m in values)}"
        for task, values in minutes.items()
        if values
    ]
    return [f"Stage time per run, minutes (pipeline.json): {'; '.join(cells)}."] if cells else []


def grid_table(
    results: dict[str, list[dict]], wanted: dict[str, int], minutes: dict[str, list[float]]
) -> str:
    """Markdown of the whole grid; `wanted`: how many seeds each task was asked for."""
    lines = [
        "| task | policy | held-out oracle score | KL to SFT (nats) | gap closed | target met "
        "| why short (runs) |",
        "|---|---|---|---|---|---|---|",
    ]
    for task, summaries in results.items():
        lines += grid_rows(task, summaries)
    counts = ", ".join(f"{t} {len(s)}/{wanted[t]}" for t, s in results.items())
    lines += [
        "",
        "Mean ± half-width of the 95 % t-interval over seeds. Gap closed: (policy − SFT) /",
        "(oracle maximum − SFT). Targets (orchestrate/pipeline_checks.py): SFT within 0.05 of",
        "the teacher's oracle score; reward model >= 0.85; PPO, GRPO, DPO close >= 50 % of the",
        "gap at KL <= 10 nats (ppo_oracle is the reference). Why short: the first reason",
        "each run's report gave (RM too weak: the reward model below 0.85 held-out accuracy",
        "while the policy missed; DPO pairs not learned: DPO's implicit reward under 0.85 on",
        "the held-out pairs; RM wrong on policy samples: under 0.7 accuracy on the policy's",
        "own samples; PPO on the oracle short too: PPO on the oracle itself, same settings,",
        "closed under half the gap; held near SFT by its KL weight: under 0.5 nats from SFT",
        f"with nothing else wrong). Finished runs: {counts}.",
    ]
    return "\n".join(lines + times_line(minutes))


def write_grid(doc: pathlib.Path, table_text: str, command: str, preset: str = "demo") -> None:
    """Replace DOC's text between the preset's grid markers (or append a section with them)."""
    begin, end = markers(preset)
    text = doc.read_text(encoding="utf-8") if doc.exists() else ""
    block = f"{begin}\n\n    {command}\n\n{table_text}\n\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n## The task × method grid\n\n" + block + "\n"
    doc.write_text(text, encoding="utf-8")


def parse_args() -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", "--tasks", dest="tasks", nargs="+", default=["uppercase"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--table-only", action="store_true", help="read finished runs only")
    parser.add_argument("--write", help="a markdown file to put the grid table into")
    parser.add_argument("--preset", default="demo", help="configs/pipeline.py's preset to run")
    return parser.parse_known_args()


def main() -> int:
    args, extra = parse_args()
    failed = []
    results: dict[str, list[dict]] = {}
    minutes: dict[str, list[float]] = {}
    for task in args.tasks:
        runs = [pathlib.Path(args.workdir) / task / f"seed{s}" for s in args.seeds]
        for seed, run in zip(args.seeds, runs, strict=True):
            if not args.table_only and run_seed(task, seed, run, extra, args.preset):
                failed.append(f"{task} seed {seed} ({run})")
        finished = [r for r in runs if (r / "summary.json").is_file()]
        results[task] = [json.loads((r / "summary.json").read_text()) for r in finished]
        minutes[task] = [m for m in map(stage_minutes, finished) if m is not None]
        if len(args.tasks) == 1 and results[task]:
            print(f"\n{task}, seeds {args.seeds}: mean ± std (per seed)\n")
            print(table(results[task]))
    grid = grid_table(results, dict.fromkeys(args.tasks, len(args.seeds)), minutes)
    print(f"\nThe grid, seeds {args.seeds}:\n\n{grid}")
    if args.write:
        command = " ".join(["python benchmarks/rlhf_results.py", *sys.argv[1:]])
        write_grid(pathlib.Path(args.write), grid, command, args.preset)
        print(f"grid written to {args.write}")
    if failed:
        print("runs that failed (rerun the same command to resume them):", *failed, sep="\n  ")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
