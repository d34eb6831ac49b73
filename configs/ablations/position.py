"""Positional encoding on tiny_shakespeare: RoPE vs learned absolute vs none (NoPE).

    flaxlm sweep --config configs/ablations/position.py --workdir /tmp/abl_position

`learned` adds a trained table [max_seq_len, d_model] (256 x 128 = 32,768 parameters) to
the token embedding, read at each token's position; `none` has no positional signal but the
causal mask (a decoder can still infer position from how many tokens it attends to).
rope_theta.py ablates the RoPE base within the RoPE arm.
"""

from __future__ import annotations

from configs.ablations.common import PRETRAIN_METRICS, SHAKESPEARE_QUICK


def get_ablation(arg: str | None = None) -> dict:
    return {
        "description": "Positional encoding (RoPE vs learned vs NoPE) on tiny_shakespeare",
        "command": "pretrain",
        "config": "configs/pretrain.py:shakespeare_char",
        "overrides": SHAKESPEARE_QUICK,
        "arms": {
            "rope": {"model.position": "rope"},
            "learned": {"model.position": "learned"},
            "none": {"model.position": "none"},
        },
        "seeds": [0, 1, 2],
        "baseline": "rope",
        "metrics": PRETRAIN_METRICS,
    }
