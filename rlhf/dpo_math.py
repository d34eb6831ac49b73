"""DPO math: the loss from policy and reference sequence log-probs, and K-wise -> pairs.

Direct Preference Optimization (Rafailov et al., 2023, eq. 7):
    z = β [(log π(y_w|x) - log π_ref(y_w|x)) - (log π(y_l|x) - log π_ref(y_l|x))]
    L = -log σ(z)
with y_w the chosen (better) and y_l the rejected response; the log-probs are sums over
the response tokens. Optional label smoothing ε (conservative DPO, Mitchell 2023):
L = -(1 - ε) log σ(z) - ε log σ(-z), for labels flipped with probability ε — our
simulated labeler's noise is of that kind.
The implicit rewards β (log π - log π_ref) give the metrics: reward accuracy (chosen
above rejected), margin, and the chosen/rejected rewards and log-probs.

K-wise rankings become pairs as the reward model reads them (train/reward_losses.py):
every pair with different ranks, the lower rank chosen; ties give no pair.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp


def sequence_log_probs(token_log_probs: jax.Array, mask: jax.Array) -> jax.Array:
    """Per-token log-probs [B, T] summed over response tokens (mask [B, T]) -> [B]."""
    if token_log_probs.shape != mask.shape or token_log_probs.ndim != 2:
        raise ValueError(f"log-probs {token_log_probs.shape} and mask {mask.shape}: need [B, T]")
    return jnp.sum(jnp.where(mask > 0, token_log_probs, 0.0), axis=-1)


def dpo_loss(
    policy_chosen: jax.Array,
    policy_rejected: jax.Array,
    ref_chosen: jax.Array,
    ref_rejected: jax.Array,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean DPO loss over [B] pairs of sequence log-probs, and its metrics.

    Metrics: reward_accuracy (chosen implicit reward > rejected), reward_margin,
    chosen_reward / rejected_reward (β·log-ratio means), logps_chosen / logps_rejected.
    """
    shapes = {a.shape for a in (policy_chosen, policy_rejected, ref_chosen, ref_rejected)}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ValueError(f"DPO inputs must all be [B] sequence log-probs, got shapes {shapes}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing={label_smoothing}: must be in [0, 0.5)")
    chosen = beta * (policy_chosen - ref_chosen)
    rejected = beta * (policy_rejected - ref_rejected)
    z = chosen - rejected
    # -log σ(z) = softplus(-z), stable for large |z|.
    losses = (1.0 - label_smoothing) * jax.nn.softplus(-z) + label_smoothing * jax.nn.softplus(z)
    metrics = {
        "reward_accuracy": jnp.mean((chosen > rejected).astype(jnp.float32)),
        "reward_margin": jnp.mean(z),
        "chosen_reward": jnp.mean(chosen),
        "rejected_reward": jnp.mean(rejected),
        "logps_chosen": jnp.mean(policy_chosen),
        "logps_rejected": jnp.mean(policy_rejected),
    }
    return jnp.mean(losses), metrics


def preference_pairs(ranks: Sequence[int]) -> list[tuple[int, int]]:
    """K ranks (0 = best, equal = tie) -> [(chosen index, rejected index)], K-choose-2 order."""
    pairs = []
    for i in range(len(ranks)):
        for j in range(i + 1, len(ranks)):
            if ranks[i] < ranks[j]:
                pairs.append((i, j))
            elif ranks[j] < ranks[i]:
                pairs.append((j, i))
    return pairs
