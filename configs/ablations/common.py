"""Shared settings of the shipped ablations (imported by the files beside it)."""

from __future__ import annotations

# shakespeare_char (4 layers, d_model 128, char vocabulary) cut to a few minutes per run on a
# 2-core CPU: 300 steps instead of 2000, a short warmup, the loss logged every 25 steps and
# evaluated every 100 on the first 40 validation batches.
SHAKESPEARE_QUICK = {
    "total_steps": 300,
    "optim.warmup_steps": 30,
    "log.every_steps": 25,
    "eval.every_steps": 100,
    "eval.max_batches": 40,
    "checkpoint.every_steps": 100,
    "checkpoint.max_to_keep": 1,
}
PRETRAIN_METRICS = ["final_eval_loss", "best_eval_loss", "final_loss", "tokens_per_sec", "wall_s"]
