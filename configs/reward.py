"""Reward-model configs (InstructGPT K-wise ranking loss).

    flaxlm reward --config configs/reward.py:tiny --workdir /tmp/reward_tiny \\
        --config.init_from=/tmp/sft_tiny \\
        --config.data.path=ranked_train.jsonl --config.eval.path=ranked_heldout.jsonl
    flaxlm score --workdir /tmp/reward_tiny --prompt "say king twice" \\
        --response "king king" --response "queen"

Data: JSONL, one prompt per line, `{"prompt": ..., "responses": [...], "ranking": [...]}`
(`ranking[k]` is the rank of `responses[k]`, 0 = best, equal = tie; K may vary per
prompt, at most `reward.max_responses` are kept) or the pairwise
`{"prompt", "chosen", "rejected"}`. `init_from` is an SFT or pretraining workdir or
checkpoint; the model shape and tokenizer come from it (`model.preset` is ignored).

reward.margin: constant margin in -log σ(r_better - r_worse - margin) (0 = InstructGPT).
reward.center_coef: weight of (mean reward of a prompt's responses)^2 (0 = off).
reward.pool: how a response's reward is read from the per-token scalar head: "last"
(its final `<|end|>` token, InstructGPT) or "mean" (over its tokens; docs/rlhf.md for
when the last read starts dead). Stored in the checkpoint; every reader uses its own.
calibration.*: reference-policy samples that fix the reward scale after training
(num_samples 0 = skip; policy "" = init_from; prompts_path "" = eval.path's prompts).

Presets: tiny (seconds on a laptop), default (a starting point on accelerators).
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
    c.stage = "reward"
    c.eval.split = "validation"  # named datasets only; a local eval.path is its own split
    c.reward = ml_collections.ConfigDict(
        {"max_responses": 4, "margin": 0.0, "center_coef": 0.0, "pool": "last"}
    )
    c.calibration = ml_collections.ConfigDict(
        {
            "num_samples": 64,
            "batch_size": 16,
            "max_new_tokens": 32,
            "temperature": 1.0,
            "top_k": 0,
            "top_p": 1.0,
            "prompts_path": "",
            "policy": "",
        }
    )
    if preset == "tiny":
        c.total_steps, c.batch_size, c.seq_len = 40, 16, 48  # batch_size counts prompts
        c.optim.lr, c.optim.warmup_steps, c.optim.weight_decay = 3e-3, 5, 0.0
        c.log.every_steps, c.eval.every_steps, c.eval.max_batches = 10, 20, 4
        c.calibration.num_samples, c.calibration.max_new_tokens = 16, 16
        c.checkpoint.every_steps = 20
    else:
        c.total_steps, c.batch_size, c.seq_len = 2000, 64, 1024
        c.optim.lr, c.optim.warmup_steps, c.optim.weight_decay = 9e-6, 100, 0.0
        c.mesh.data, c.mesh.fsdp = 1, -1
        c.log.every_steps, c.eval.every_steps, c.eval.max_batches = 20, 200, 50
        c.calibration.num_samples, c.calibration.max_new_tokens = 1024, 256
        c.calibration.batch_size = 64
        c.checkpoint.every_steps = 500
    return c
