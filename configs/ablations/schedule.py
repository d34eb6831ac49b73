"""Learning-rate schedule on tiny_shakespeare: cosine vs warmup-stable-decay vs constant.

    flaxlm sweep --config configs/ablations/schedule.py --workdir /tmp/abl_schedule

Same AdamW, peak lr 2e-3 and 30 warmup steps in every arm; cosine and WSD decay to
0.1 x peak by the last step (WSD: flat, then linear over the last 20% of steps), constant
never decays. WSD equals constant until its decay starts at step 240, so mid-run eval
losses compare decayed against undecayed weights; the table has final and best eval loss.
"""

from __future__ import annotations

from configs.ablations.common import PRETRAIN_METRICS, SHAKESPEARE_QUICK


def get_ablation(arg: str | None = None) -> dict:
    return {
        "description": "LR schedule (cosine vs WSD vs constant) on tiny_shakespeare",
        "command": "pretrain",
        "config": "configs/pretrain.py:shakespeare_char",
        "overrides": SHAKESPEARE_QUICK,
        "arms": {
            "cosine": {"optim.schedule": "cosine"},
            "wsd": {"optim.schedule": "wsd", "optim.decay_fraction": 0.2},
            "constant": {"optim.schedule": "constant"},
        },
        "seeds": [0, 1, 2],
        "baseline": "cosine",
        "metrics": PRETRAIN_METRICS,
    }
