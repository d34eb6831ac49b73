"""Rotary-embedding base (rope_theta) on tiny_shakespeare.

    flaxlm sweep --config configs/ablations/rope_theta.py --workdir /tmp/abl_rope

RoPE against learned absolute positions and NoPE is position.py.
theta sets the longest wavelength: 100 makes even the slowest pair of dimensions rotate
within the 64-character context; 10,000 (Llama) and 1,000,000 (long-context models) leave
the slow pairs nearly position-independent at this length.
"""

from __future__ import annotations

from configs.ablations.common import PRETRAIN_METRICS, SHAKESPEARE_QUICK


def get_ablation(arg: str | None = None) -> dict:
    return {
        "description": "RoPE base theta on tiny_shakespeare",
        "command": "pretrain",
        "config": "configs/pretrain.py:shakespeare_char",
        "overrides": SHAKESPEARE_QUICK,
        "arms": {
            "theta1e4": {"model.rope_theta": 10_000.0},
            "theta100": {"model.rope_theta": 100.0},
            "theta1e6": {"model.rope_theta": 1_000_000.0},
        },
        "seeds": [0, 1, 2],
        "baseline": "theta1e4",
        "metrics": PRETRAIN_METRICS,
    }
