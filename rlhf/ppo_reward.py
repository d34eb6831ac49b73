"""Where PPO's last-token reward comes from, and the host-side oracle it can use.

`ppo.reward` picks the score added at the last response token (rlhf/ppo_math.py
`per_token_rewards`):
- "model" (default): the frozen reward model's calibrated score gain·raw + bias
  (train/reward.py `load_calibration`): RLHF proper;
- "oracle": the task's hidden oracle score of the decoded response (rlhf/tasks.py
  `score`, in [0, 1] for the shipped tasks), computed on the host and placed on the mesh
  as a [B] fp32 array: PPO against the true objective, an upper reference for what the
  reward model's imperfections cost (Gao et al., 2023 call this the gold reward).
Everything else (KL penalty, missing-eos penalty, GAE) is the same for both, and the
reward model still scores every rollout in oracle mode, so `rm_score` stays comparable.

Host helpers gather global arrays first (train/sft.py `to_host`): every process decodes
the same texts and places the same scores.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from model import sharding as sh
from model.tokenizer import AnyTokenizer
from rlhf import ppo_learner as pl
from rlhf import rollout as ro
from train.sft import to_host

REWARD_SOURCES = ("model", "oracle")


def prompt_texts(tokenizer: AnyTokenizer, prompt_tokens: np.ndarray) -> list[str]:
    """The last user turn of each left-padded chat prompt row [B, P] (for the oracle), as
    the tokenizer's chat template locates it."""
    return [tokenizer.last_user_text(row) for row in np.asarray(prompt_tokens).tolist()]


def rollout_texts(tokenizer: AnyTokenizer, rollout: ro.Rollout) -> tuple[list[str], list[str]]:
    """(user turns [B], decoded responses [B]) of a rollout, gathered to the host."""
    prompts = prompt_texts(tokenizer, to_host(rollout.prompt_tokens))
    host = rollout._replace(tokens=to_host(rollout.tokens), mask=to_host(rollout.mask))
    return prompts, ro.decode_responses(tokenizer, host)


def oracle_row_scores(task: Any, tokenizer: AnyTokenizer, rollout: ro.Rollout) -> np.ndarray:
    """The hidden oracle's score of each response, [B] float32 on the host."""
    prompts, responses = rollout_texts(tokenizer, rollout)
    scores = [task.score(p, r) for p, r in zip(prompts, responses, strict=True)]
    return np.asarray(scores, np.float32)


def oracle_score(task: Any, tokenizer: AnyTokenizer, rollout: ro.Rollout) -> float:
    """Mean hidden-oracle score of the rollout's responses (host side, metrics only)."""
    return float(np.mean(oracle_row_scores(task, tokenizer, rollout)))


def to_mesh(values: np.ndarray, mesh: jax.sharding.Mesh, rules: sh.Rules) -> jax.Array:
    """A host [B] array, equal on every process, as a batch-sharded global array."""
    values = np.asarray(values, np.float32)
    sharding = sh.batch_sharding(mesh, rules, values.ndim)
    return jax.make_array_from_callback(values.shape, sharding, lambda index: values[index])


def make_experience_fn(
    config: ml_collections.ConfigDict,
    calibration: dict,
    tokenizer: AnyTokenizer,
    mesh: jax.sharding.Mesh,
    rules: sh.Rules,
    task: Any = None,
) -> Any:
    """(scored, rollout, β) -> (Experience, metrics as floats, last-token scores [B]).

    `scored` is rlhf/ppo_learner.py `score_rollout`'s output. The last-token score is the
    calibrated reward-model score or, with ppo.reward = "oracle", the oracle's (before the
    missing-eos penalty). Metrics are `make_experience`'s with rm_score always the reward
    model's, plus oracle_score (mean, host side) when a task is given.
    """
    p = config.ppo
    source = p.get("reward", "model")
    if source not in REWARD_SOURCES:
        raise ValueError(f"ppo.reward={source!r}: choose from {REWARD_SOURCES}")
    if source == "oracle" and task is None:
        raise ValueError("ppo.reward=oracle needs a task")
    gain, bias = float(calibration["gain"]), float(calibration["bias"])

    @jax.jit
    def experience(scored: dict, rollout: ro.Rollout, beta: jax.Array, oracle: Any) -> tuple:
        rm_scores = gain * scored["raw_scores"] + bias
        scores = rm_scores if oracle is None else oracle
        # make_experience calibrates raw_scores with (gain, bias); pass the chosen scores
        # through it unchanged (x·1 + 0 is exact) so the two sources share one code path.
        exp, metrics = pl.make_experience(
            scored | {"raw_scores": scores}, rollout, beta, 1.0, 0.0, p, config.kl.estimator
        )
        return exp, metrics | {"rm_score": jnp.mean(rm_scores)}, scores

    def run(scored: dict, rollout: ro.Rollout, beta: jax.Array) -> tuple:
        oracle = None if task is None else oracle_row_scores(task, tokenizer, rollout)
        placed = to_mesh(oracle, mesh, rules) if source == "oracle" else None
        exp, metrics, scores = experience(scored, rollout, beta, placed)
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if oracle is not None:
            metrics["oracle_score"] = float(np.mean(oracle))
        return exp, metrics, scores

    return run
