"""MLP activation on tiny_shakespeare: SwiGLU vs GELU at equal parameter count.

    flaxlm sweep --config configs/ablations/activation.py --workdir /tmp/abl_activation

SwiGLU has three MLP matrices and GELU two, so the GELU arm's mlp_dim is 1.5x larger
(768 vs 512): both arms have the same parameters and nearly the same FLOPs per token.
Normalization and positional encoding have their own files: norm.py, position.py.
"""

from __future__ import annotations

from configs.ablations.common import PRETRAIN_METRICS, SHAKESPEARE_QUICK


def get_ablation(arg: str | None = None) -> dict:
    return {
        "description": "MLP activation (SwiGLU vs GELU, equal parameters) on tiny_shakespeare",
        "command": "pretrain",
        "config": "configs/pretrain.py:shakespeare_char",
        "overrides": SHAKESPEARE_QUICK,
        "arms": {
            "swiglu": {"model.activation": "swiglu", "model.mlp_dim": 512},
            "gelu": {"model.activation": "gelu", "model.mlp_dim": 768},
        },
        "seeds": [0, 1, 2],
        "baseline": "swiglu",
        "metrics": PRETRAIN_METRICS,
    }
