"""Key/value heads on tiny_shakespeare: multi-head (4 kv heads) vs grouped-query (2) vs
multi-query (1) attention, with the 4 query heads of shakespeare_char.

    flaxlm sweep --config configs/ablations/attention.py --workdir /tmp/abl_attention

Fewer kv heads shrink the K/V projections and the decode-time KV cache; the table shows
what that costs in loss at this scale.
"""

from __future__ import annotations

from configs.ablations.common import PRETRAIN_METRICS, SHAKESPEARE_QUICK


def get_ablation(arg: str | None = None) -> dict:
    return {
        "description": "KV heads (MHA vs GQA vs MQA) on tiny_shakespeare",
        "command": "pretrain",
        "config": "configs/pretrain.py:shakespeare_char",
        "overrides": SHAKESPEARE_QUICK,
        "arms": {
            "mha": {"model.num_kv_heads": 4},
            "gqa2": {"model.num_kv_heads": 2},
            "mqa": {"model.num_kv_heads": 1},
        },
        "seeds": [0, 1, 2],
        "baseline": "mha",
        "metrics": PRETRAIN_METRICS,
    }
