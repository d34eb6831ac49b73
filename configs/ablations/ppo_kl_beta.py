"""PPO's KL coefficient β: reward vs KL frontier, through the whole pipeline.

    flaxlm sweep --config configs/ablations/ppo_kl_beta.py --workdir /tmp/abl_kl_beta

A fixed β (kl.target 0, no adaptive controller) of 0.01, 0.05 (configs/ppo.py's default)
and 0.2. Small β buys reward-model score with KL from the SFT policy; the oracle score
shows whether that score is real or reward hacking. frontier.png plots RM score against
KL per seed and per arm.

Reads each run's DIR/summary.json and stage metrics written by `flaxlm pipeline`
(orchestrate/pipeline_report.py). Not run for docs/ablations.md yet: each arm is a whole
pipeline (~10 minutes on 2 CPU cores). The earlier stages are identical across arms of a
seed; they are recomputed per arm (the sweep does not share stage outputs).
"""

from __future__ import annotations


def get_ablation(arg: str | None = None) -> dict:
    return {
        "description": "PPO KL coefficient β (pipeline): reward vs KL",
        "command": "pipeline",
        "config": "configs/pipeline.py:demo",
        "overrides": {"ppo.kl.target": 0.0},
        "arms": {f"beta{b}": {"ppo.kl.beta": b} for b in (0.01, 0.05, 0.2)},
        "seeds": [0, 1, 2],
        "baseline": "beta0.05",
        "metrics": [
            {
                "name": "rm_score",
                "label": "PPO RM score (last iteration)",
                "file": "summary.json",
                "key": "ppo_rm_score",
            },
            {
                "name": "kl",
                "label": "KL to SFT (nats/response)",
                "file": "summary.json",
                "key": "ppo_kl",
            },
            {
                "name": "oracle_score",
                "label": "PPO held-out oracle score",
                "file": "summary.json",
                "key": "ppo_oracle_sampled",
            },
            {
                "name": "oracle_gain",
                "label": "oracle gain over SFT",
                "file": "summary.json",
                "key": "ppo_oracle_gain",
            },
            "wall_s",
        ],
        "curves": [
            {"file": "ppo/metrics.jsonl", "key": "rm_score", "label": "PPO RM score"},
            {"file": "ppo/metrics.jsonl", "key": "kl", "label": "KL to SFT"},
        ],
        "frontier": ["kl", "rm_score"],
    }
