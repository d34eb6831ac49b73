"""GRPO configs: policy and frozen reference from SFT, G samples per prompt, no critic.

    flaxlm grpo --config configs/grpo.py:tiny --workdir /tmp/grpo_tiny \\
        --config.init_from=/tmp/sft_tiny --config.reward_from=/tmp/reward_tiny \\
        --config.data.path=prompts.jsonl --config.task=addition

Data: a prompts JSONL, one `{"prompt": ...}` (or `{"messages": [...]}`) per line
(`data.path`, or `data.name` for a prepared TFDS dataset). `init_from` is the SFT run
(policy and frozen reference). `grpo.reward` picks the score of a response:
`model` (default) the calibrated reward model of `reward_from` (a `flaxlm reward` run
with its `reward_calibration.json`); `oracle` the hidden oracle of `task` (e.g.
`addition`), computed on the host from the decoded text: the upper-bound reference
(`reward_from` then only adds rm_score to the metrics). `task` alone adds the oracle's
score to the metrics.

One loop step is one GRPO iteration: `batch_size` prompts x `grpo.group_size` samples
→ scores (minus `grpo.missing_eos_penalty` for responses that hit the token limit) →
advantages normalized within each prompt's group (`grpo.scale_by_std` False = Dr. GRPO)
→ `grpo.epochs` passes over `grpo.minibatches` shuffled minibatches of the clipped loss
plus `kl.beta`·k3 KL to the reference. `seq_len` is the (left padded) prompt length;
`grpo.max_new_tokens` the response budget. Eval (`eval.every_steps`) samples one
response per held-out prompt (`eval.path`, `eval.batch_size` of them).

`health.enabled`, `health.window` (W, default 5): rollout health checks (rlhf/health.py);
W iterations without any parameter change stop the run, other stuck signals warn once.

Presets: tiny (well under a minute on 2 CPU cores), default (a starting point on
accelerators).
"""

from __future__ import annotations

import ml_collections

from configs.rl_base import PRESETS, check_preset, rl_base_config

__all__ = ["PRESETS", "get_config"]


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = check_preset(arg)
    # Shared keys: reward_from, task, sampling, health, the grpo.* rollout keys, and the
    # presets' max_new_tokens, mesh, logging and log_prob_atol (configs/rl_base.py).
    c = rl_base_config("grpo", preset, rollouts=True)
    # DeepSeekMath's β = 0.04 on k3 per token; 0 drops the KL term.
    c.kl = ml_collections.ConfigDict({"beta": 0.04})
    c.grpo.update({"group_size": 4, "scale_by_std": True})
    if preset == "tiny":
        c.total_steps, c.batch_size, c.seq_len = 8, 8, 24
        c.grpo.epochs, c.grpo.minibatches = 2, 2
        c.optim.lr = 1e-4
        c.eval.batch_size = 32
    else:
        # DeepSeekMath: 64 samples per prompt, lr 1e-6, one update per batch.
        c.total_steps, c.batch_size, c.seq_len = 1000, 16, 512
        c.grpo.group_size = 16
        c.optim.lr, c.optim.warmup_steps = 1e-6, 10
    return c
