"""Rank samples of a run's trained policy and add them to the run's ranked data: a probe of
docs/rlhf.md ("Why they stop short", the last section).

    python benchmarks/policy_ranked_rm.py --workdir RUN --policy ppo --prompts 1000

Samples K responses per prompt from RUN/POLICY on the first N training prompts, at the
rm_data stage's settings (K, temperature, new tokens), ranks them with the run's simulated
labeler and appends the groups to RUN/rm_data/ranked.jsonl; the SFT groups stay, and the
file as it was is kept as ranked.sft.jsonl (a second call starts from that copy). Then
retrain the reward model on the mixture and rerun PPO from SFT against it:

    flaxlm pipeline --config configs/pipeline.py:demo --workdir RUN --config.task=TASK \
        --config.seed=S --config.stages=... --stages reward,ppo,report --from-stage reward \
        --config.reward.total_steps=STEPS   # one epoch: groups / reward.batch_size
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys

import jax
import ml_collections
import numpy as np

from orchestrate.pipeline_stages import sample_k
from orchestrate.workdir import data_paths, read_prompts
from rlhf import rm_data
from rlhf.labeler import Labeler, write_jsonl
from rlhf.tasks import load_task
from train.sample import Policy

SALT = 11  # the rm_data stage folds 7 into the seed; a different stream for these samples


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=pathlib.Path, required=True)
    parser.add_argument("--policy", default="ppo", help="the stage whose policy is sampled")
    parser.add_argument("--prompts", type=int, default=1000, help="training prompts to use")
    args = parser.parse_args(argv)
    run = args.workdir
    config = ml_collections.ConfigDict(json.loads((run / "config.json").read_text()))
    policy_dir = run / args.policy
    if not (policy_dir / "checkpoints").is_dir():
        print(f"error: {policy_dir} has no checkpoints", file=sys.stderr)
        return 2
    paths = data_paths(run)
    original = paths["ranked"].with_name("ranked.sft.jsonl")
    if not original.exists():
        shutil.copyfile(paths["ranked"], original)

    policy = Policy(str(policy_dir))
    prompts = read_prompts(paths["prompts"], args.prompts)
    key = jax.random.fold_in(jax.random.key(config.seed), SALT)
    groups = sample_k(config, policy, prompts, key, f"{args.policy} samples")
    labeler = Labeler(config.labeler.random_rate, config.labeler.score_noise)
    rng = np.random.default_rng([config.seed, SALT])
    records, summary = rm_data.ranked_records(load_task(config.task), prompts, groups, labeler, rng)
    before = original.read_text().splitlines(keepends=True)
    write_jsonl(paths["ranked"], [json.loads(line) for line in before] + records)
    total = len(before) + len(records)
    # summary["groups"]: this policy's groups kept; total_groups: the file's, SFT's included
    print(json.dumps({"policy": args.policy, **summary, "total_groups": total}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
