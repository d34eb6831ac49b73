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

from configs.base import base_config

PRESETS = ("tiny", "default")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = arg or "tiny"
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {PRESETS}")
    c = base_config()
    c.stage = "grpo"
    c.reward_from = ""  # a `flaxlm reward` workdir or checkpoint (grpo.reward=model)
    c.task = ""  # the hidden oracle: metrics, or the reward with grpo.reward=oracle
    c.sampling = ml_collections.ConfigDict({"temperature": 1.0, "top_k": 0, "top_p": 1.0})
    # DeepSeekMath's β = 0.04 on k3 per token; 0 drops the KL term.
    c.kl = ml_collections.ConfigDict({"beta": 0.04})
    c.grpo = ml_collections.ConfigDict(
        {
            "group_size": 4,
            "reward": "model",
            "scale_by_std": True,
            "max_new_tokens": 16,
            "epochs": 1,
            "minibatches": 1,
            "clip_eps": 0.2,
            "missing_eos_penalty": 1.0,
            "log_prob_atol": 1e-3,  # the sampler/learner health check (fp32; loosen for bf16)
        }
    )
    # Rollout health checks (rlhf/health.py): warn or stop when W = window iterations in a
    # row show a run that cannot learn.
    c.health = ml_collections.ConfigDict({"enabled": True, "window": 5})
    c.optim.schedule, c.optim.weight_decay = "constant", 0.0
    if preset == "tiny":
        c.total_steps, c.batch_size, c.seq_len = 8, 8, 24
        c.grpo.max_new_tokens, c.grpo.epochs, c.grpo.minibatches = 8, 2, 2
        c.optim.lr, c.optim.warmup_steps = 1e-4, 0
        c.eval.batch_size = 32
        c.log.every_steps = 1
    else:
        # DeepSeekMath: 64 samples per prompt, lr 1e-6, one update per batch.
        c.total_steps, c.batch_size, c.seq_len = 1000, 16, 512
        c.grpo.group_size, c.grpo.max_new_tokens = 16, 256
        c.optim.lr, c.optim.warmup_steps = 1e-6, 10
        c.mesh.data, c.mesh.fsdp = 1, -1
        c.log.every_steps, c.checkpoint.every_steps = 1, 100
        c.grpo.log_prob_atol = 5e-2  # bf16 compute: cached decode and full forward round apart
    return c
