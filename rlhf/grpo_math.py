"""GRPO math: group-normalized advantages and the per-sequence clipped loss with k3 KL.

Group Relative Policy Optimization (Shao et al., 2024, DeepSeekMath, eq. 3 and
section 4.1.2, outcome supervision): G responses are sampled per prompt and scored; each
response's advantage is its score normalized within its group,
    Â_i = (r_i - mean(r_group)) / (std(r_group) + eps),
and applies to every token of the response (no critic). The loss is the PPO clipped
surrogate plus β·KL(π ‖ π_ref) per token with the k3 estimator, averaged per response
over its tokens, then over responses:
    L = -1/G Σ_i 1/|o_i| Σ_t [min(ρ Â_i, clip(ρ, 1 ± ε) Â_i) - β k3_t].
Decisions: std is the population std (ddof 0) of the group; `scale_by_std=False`
drops the division (Liu et al., 2025, "Dr. GRPO", which finds it biases towards easy or
hard prompts). Scores are laid out [N, G]: N prompts, G responses each; the flattened
[N*G] order (prompt-major) matches the rollout batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf import kl as kl_lib
from rlhf.ppo_math import check_bt, masked_mean


def group_advantages(scores: jax.Array, eps: float = 1e-6, scale_by_std: bool = True) -> jax.Array:
    """Scores [N, G] -> advantages [N, G], normalized within each row (group).

    A group whose scores are all equal gets advantages 0 (it carries no signal).
    """
    if scores.ndim != 2 or scores.shape[1] < 2:
        raise ValueError(f"scores {scores.shape}: need [N prompts, G >= 2 responses]")
    scores = scores.astype(jnp.float32)
    centered = scores - jnp.mean(scores, axis=1, keepdims=True)
    if not scale_by_std:
        return centered
    return centered / (jnp.std(scores, axis=1, keepdims=True) + eps)


def grpo_loss(
    log_probs: jax.Array,
    old_log_probs: jax.Array,
    ref_log_probs: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    clip_eps: float,
    beta: float,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The GRPO objective as a loss. Per-token inputs [B, T] (B = N·G), advantages [B].

    Returns (loss, metrics: clip_fraction, kl (mean k3 per token), response_kl (mean
    summed k3 per response)).
    """
    check_bt(log_probs=log_probs, old_log_probs=old_log_probs, ref=ref_log_probs, mask=mask)
    if advantages.shape != mask.shape[:1]:
        raise ValueError(f"advantages {advantages.shape} must be [B] for mask {mask.shape}")
    adv = advantages[:, None].astype(jnp.float32)
    ratio = jnp.exp(log_probs - old_log_probs)
    surrogate = jnp.minimum(ratio * adv, jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * adv)
    k3 = kl_lib.kl_k3(log_probs, ref_log_probs)
    per_token = -(surrogate - beta * k3)
    per_response = masked_mean(per_token, mask, axis=1)  # 1/|o_i| Σ_t
    metrics = {
        "clip_fraction": masked_mean((ratio * adv > surrogate).astype(jnp.float32), mask),
        "kl": masked_mean(k3, mask),
        "response_kl": jnp.mean(kl_lib.sequence_kl(k3, mask)),
    }
    return jnp.mean(per_response), metrics
