"""Reward-model K: 2 vs 4 vs 8 ranked responses per prompt at the same labeling budget,
through the whole pipeline (SFT samples → simulated labeler → reward model → PPO).

    flaxlm sweep --config configs/ablations/reward_k.py --workdir /tmp/abl_reward_k

Budget: the labeler reads K responses per prompt, so prompts x K is held at 2,048
responses: K=2 on 1,024 prompts (1 pair each), K=4 on 512 (6 pairs), K=8 on 256 (28
pairs). InstructGPT's argument for K=9 is that ranking K costs little more than comparing
two while yielding K-choose-2 pairs; this measures what that buys in held-out pairwise
accuracy against the oracle, and downstream in PPO's oracle score.

Reads each run's DIR/summary.json and stage metrics written by `flaxlm pipeline`
(orchestrate/pipeline_report.py). Not run for docs/ablations.md yet: each arm is a whole
pipeline (~10 minutes on 2 CPU cores), so 3 arms x 3 seeds is ~1.5 hours.
"""

from __future__ import annotations

BUDGET = 2048  # responses read by the labeler, per arm


def get_ablation(arg: str | None = None) -> dict:
    return {
        "description": "Reward-model K at a fixed labeling budget (pipeline)",
        "command": "pipeline",
        "config": "configs/pipeline.py:demo",
        "arms": {f"k{k}": {"rm_data.k": k, "rm_data.num_prompts": BUDGET // k} for k in (2, 4, 8)},
        "seeds": [0, 1, 2],
        "baseline": "k4",
        "metrics": [
            {"name": "rm_accuracy", "file": "summary.json", "key": "reward_eval_pair_accuracy"},
            {
                "name": "rm_kendall_tau",
                "label": "RM Kendall τ",
                "file": "summary.json",
                "key": "reward_eval_kendall_tau",
            },
            {
                "name": "oracle_score",
                "label": "PPO held-out oracle score",
                "file": "summary.json",
                "key": "ppo_oracle_sampled",
            },
            {"name": "kl", "file": "summary.json", "key": "ppo_kl"},
            "wall_s",
        ],
        "curves": [
            {"file": "reward/metrics.jsonl", "key": "eval_pair_accuracy", "label": "RM accuracy"},
            {"file": "ppo/metrics.jsonl", "key": "rm_score", "label": "PPO RM score"},
        ],
    }
