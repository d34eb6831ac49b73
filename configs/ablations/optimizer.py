"""Optimizer on tiny_shakespeare: AdamW vs Lion, each at its usual operating point.

    flaxlm sweep --config configs/ablations/optimizer.py --workdir /tmp/abl_optimizer

Lion's update is a sign, so its per-step change is larger than Adam's: the usual recipe
(Chen et al. 2023) is a 3-10x smaller learning rate and a correspondingly larger decoupled
weight decay, keeping lr x weight_decay about equal. Here AdamW lr 2e-3 / wd 0.1 against
Lion lr 3e-4 / wd 0.67 (lr x wd = 2e-4 in both). `:adafactor` adds an Adafactor arm.
"""

from __future__ import annotations

from configs.ablations.common import PRETRAIN_METRICS, SHAKESPEARE_QUICK


def get_ablation(arg: str | None = None) -> dict:
    arms = {
        "adamw": {"optim.name": "adamw", "optim.lr": 2e-3, "optim.weight_decay": 0.1},
        "lion": {"optim.name": "lion", "optim.lr": 3e-4, "optim.weight_decay": 0.67},
    }
    if arg == "adafactor":
        arms["adafactor"] = {"optim.name": "adafactor", "optim.lr": 2e-3, "optim.weight_decay": 0.1}
    return {
        "description": "Optimizer (AdamW vs Lion) on tiny_shakespeare",
        "command": "pretrain",
        "config": "configs/pretrain.py:shakespeare_char",
        "overrides": SHAKESPEARE_QUICK,
        "arms": arms,
        "seeds": [0, 1, 2],
        "baseline": "adamw",
        "metrics": PRETRAIN_METRICS,
    }
