"""PPO (RLHF) configs: policy from SFT, value model and reward from a reward model.

    flaxlm ppo --config configs/ppo.py:tiny --workdir /tmp/ppo_tiny \\
        --config.init_from=/tmp/sft_tiny --config.reward_from=/tmp/reward_tiny \\
        --config.data.path=prompts.jsonl --config.task=addition

Data: a prompts JSONL, one `{"prompt": ...}` (or `{"messages": [...]}`) per line
(`data.path`, or `data.name` for a prepared TFDS dataset). `init_from` is the SFT run
(policy and frozen reference); `reward_from` a `flaxlm reward` run with its
`reward_calibration.json` (value model and reward). `task` (optional, e.g. `addition`,
`sort` or `module:Class`) adds the hidden oracle's score to the metrics.

`ppo.reward`: "model" (default) rewards the last token with the calibrated reward-model
score; "oracle" with the task's oracle score instead (needs `task`; an upper reference:
PPO against the true objective; the value model still starts from `reward_from`).

One loop step is one PPO iteration: `batch_size` prompts → rollouts → scores →
`ppo.epochs` passes over `ppo.minibatches` minibatches. `seq_len` is the (left padded)
prompt length; `ppo.max_new_tokens` the response budget.
kl.target 0 = fixed β (`kl.beta`), else the adaptive controller (target nats per
response, horizon in responses). `optim.*` drives the policy, `value_lr` the value model.

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
    # Shared keys: reward_from, task, sampling, health, the ppo.* rollout keys, and the
    # presets' max_new_tokens, mesh, logging and log_prob_atol (configs/rl_base.py).
    c = rl_base_config("ppo", preset, rollouts=True)
    c.kl = ml_collections.ConfigDict(
        {"beta": 0.05, "target": 0.0, "horizon": 10_000.0, "estimator": "k1"}
    )
    c.ppo.update(
        {
            "epochs": 4,
            "minibatches": 2,
            "value_clip_eps": 0.2,
            "vf_coef": 0.1,
            "ent_coef": 0.0,
            "gamma": 1.0,
            "lam": 0.95,
            "whiten_advantages": True,
            "value_lr": 1e-4,
        }
    )
    if preset == "tiny":
        c.total_steps, c.batch_size, c.seq_len = 8, 16, 24
        c.optim.lr, c.ppo.value_lr = 1e-4, 1e-3
    else:
        c.total_steps, c.batch_size, c.seq_len = 1000, 64, 512
        c.optim.lr, c.optim.warmup_steps, c.ppo.value_lr = 1e-6, 10, 1e-5
        c.kl.target = 6.0
    return c
