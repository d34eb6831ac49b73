"""Normalization on tiny_shakespeare: RMSNorm vs LayerNorm.

    flaxlm sweep --config configs/ablations/norm.py --workdir /tmp/abl_norm

Every norm (two per block and the final one) switches together. LayerNorm subtracts the
mean and adds a learned bias: 128 more parameters per norm (1,152 in all at 4 layers),
negligible next to the ~0.8M of the model, so the arms are compared at equal shapes.
"""

from __future__ import annotations

from configs.ablations.common import PRETRAIN_METRICS, SHAKESPEARE_QUICK


def get_ablation(arg: str | None = None) -> dict:
    return {
        "description": "Normalization (RMSNorm vs LayerNorm) on tiny_shakespeare",
        "command": "pretrain",
        "config": "configs/pretrain.py:shakespeare_char",
        "overrides": SHAKESPEARE_QUICK,
        "arms": {
            "rmsnorm": {"model.norm": "rmsnorm"},
            "layernorm": {"model.norm": "layernorm"},
        },
        "seeds": [0, 1, 2],
        "baseline": "rmsnorm",
        "metrics": PRETRAIN_METRICS,
    }
