"""The reward read of docs/rlhf.md: the reward stage of finished pipeline runs retrained
with each `reward.pool`, from the same SFT policy and the same ranked data.

    python benchmarks/reward_read.py --workdir /work/grid --tasks rotate next_letter \\
        --seeds 0 1 2 3 4 --out /tmp/reward_read

WORKDIR/TASK/seedN is a finished `benchmarks/rlhf_results.py` run. Each (run, pool) trains
the reward model again from the run's recorded reward config (reward/config.json) with
`reward.pool` set and calibration off, in OUT/POOL/TASK/seedN (an existing one resumes,
or is read back when finished). It prints, per run and pool, the held-out pairwise
accuracy against the oracle at the end and the median gradient norm over the logged
steps (a read that stalls sits near 0.1 where one that learns keeps 0.5-1.0), then per
task the mean and how many runs reached 0.85. One CPU run takes 25-60 s.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import ml_collections
import numpy as np

from orchestrate.pipeline_checks import RM_ACCURACY
from train import reward
from train import reward_losses as rl
from train.metrics import read_metrics


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="finished rlhf_results runs")
    parser.add_argument("--tasks", nargs="+", required=True)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--pools", nargs="+", default=list(rl.POOLS), choices=rl.POOLS)
    parser.add_argument("--out", required=True, help="where the retrained models go")
    return parser.parse_args()


def reward_config(run: pathlib.Path, pool: str) -> ml_collections.ConfigDict:
    """The run's reward config with `pool`, no calibration and no mid-run checkpoints."""
    path = run / "reward" / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a finished pipeline run")
    config = ml_collections.ConfigDict(json.loads(path.read_text()))
    config.reward.pool = pool
    config.calibration.num_samples = 0
    config.checkpoint.every_steps = 0
    return config


def retrain(run: pathlib.Path, pool: str, out: pathlib.Path) -> dict:
    """{accuracy, grad_norm (median)} of the reward stage retrained with `pool` in `out`."""
    if reward.run(reward_config(run, pool), out):  # resumes, or returns at once when done
        raise RuntimeError(f"the reward stage failed in {out}")
    rows = read_metrics(out)
    accuracy = [r["eval_pair_accuracy"] for r in rows if "eval_pair_accuracy" in r]
    grad_norm = [r["grad_norm"] for r in rows if "grad_norm" in r]
    if not accuracy or not grad_norm:
        raise RuntimeError(f"{out}/metrics.jsonl has no evaluation (eval.every_steps 0?)")
    return {"accuracy": accuracy[-1], "grad_norm": float(np.median(grad_norm))}


def main() -> int:
    args = parse_args()
    root, out = pathlib.Path(args.workdir), pathlib.Path(args.out)
    results: dict[tuple[str, str], list[float]] = {}
    for task in args.tasks:
        for seed in args.seeds:
            for pool in args.pools:
                name = f"{task}/seed{seed}"
                got = retrain(root / name, pool, out / pool / name)
                results.setdefault((task, pool), []).append(got["accuracy"])
                print(
                    f"{name} pool={pool}: held-out accuracy {got['accuracy']:.3f}, "
                    f"median grad_norm {got['grad_norm']:.3f}",
                    flush=True,
                )
    print("\n| task | pool | held-out accuracy per seed | mean | >= 0.85 |\n|---|---|---|---|---|")
    for (task, pool), values in results.items():
        met = sum(v >= RM_ACCURACY for v in values)
        per_seed = ", ".join(f"{v:.3f}" for v in values)
        mean = sum(values) / len(values)
        print(f"| {task} | {pool} | {per_seed} | {mean:.3f} | {met}/{len(values)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
