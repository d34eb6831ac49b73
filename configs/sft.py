"""Supervised fine-tuning configs.

    flaxlm pretrain --config configs/pretrain.py:tiny --workdir /tmp/pretrain_tiny
    flaxlm sft --config configs/sft.py:tiny --workdir /tmp/sft_tiny \\
        --config.init_from=/tmp/pretrain_tiny \\
        --config.data.path=train.jsonl --config.eval.path=heldout.jsonl

Data: JSONL, one conversation per line, `{"prompt": ..., "response": ...}` (optionally
`"system"`) or `{"messages": [{"role": ..., "content": ...}, ...]}`; `data.path` is a
file or glob (`data.name` for a prepared TFDS dataset), `eval.path` the held-out file.
`init_from` is a pretraining or SFT workdir (its newest checkpoint) or one checkpoint
directory `<workdir>/checkpoints/N`; the model shape and tokenizer come from it, so
`model.preset` is ignored and `model.<field>` may change numerics only (dtype, dropout,
remat, max_seq_len).

Presets: tiny (seconds on a laptop: the tiny pretraining run's model), default (a
starting point on accelerators: lr 2e-5, FSDP over the host).
"""

from __future__ import annotations

import ml_collections

from configs.base import base_config

PRESETS = ("tiny", "default")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = arg or "tiny"
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {PRESETS}")
    c = base_config()
    c.stage = "sft"
    c.data.packing = "first_fit"  # packed rows; segment ids keep conversations apart
    c.eval.split = "validation"  # named datasets only; a local eval.path is its own split
    c.eval.num_samples = 3  # held-out prompts answered at each eval (0: none)
    c.eval.temperature = 0.7
    c.eval.top_k = 0
    c.eval.top_p = 1.0
    if preset == "tiny":
        c.total_steps, c.batch_size, c.seq_len = 20, 8, 128
        c.optim.lr, c.optim.warmup_steps, c.optim.weight_decay = 1e-3, 2, 0.0
        c.log.every_steps, c.eval.every_steps, c.eval.max_batches = 5, 10, 2
        c.eval.sample_tokens = 24
        c.checkpoint.every_steps = 10
    else:
        c.total_steps, c.batch_size, c.seq_len = 2000, 64, 2048
        c.optim.lr, c.optim.warmup_steps, c.optim.weight_decay = 2e-5, 100, 0.0
        c.mesh.data, c.mesh.fsdp = 1, -1
        c.log.every_steps, c.eval.every_steps, c.eval.max_batches = 20, 200, 50
        c.eval.sample_tokens = 256
        c.checkpoint.every_steps = 500
    return c
