"""PPO math for RLHF: rewards per token, GAE, whitening, clipped losses, entropy.

Shapes: B responses, T response tokens, V vocabulary. Every per-token array is [B, T]
and aligned with the sampler's output (model/generate.py `GenerateOutput`): index t is
the t-th generated token, `mask` [B, T] is 1 on generated tokens (up to and including
the end-of-turn token) and 0 after. Masks must be prefixes (1…1 0…0 per row): GAE treats
the first 0 as the end of the episode. Masked positions of every output are 0.
`values[b, t]` is V of the state *before* token t: the value head read at the same
positions as the logits that predict token t (joined prompt + response positions
P - 1 + t, as model/generate.py `completion_log_probs` reads logits), so the score given
at the last token is what V at the position before it must predict.

Conventions (Ziegler et al., 2019; Stiennon et al., 2020; Ouyang et al., 2022):
- reward r_t = -β·KL_t for each response token, plus the (normalized) reward-model score
  at the last response token; KL_t is an estimator from rlhf/kl.py (k1 by default);
- γ and λ discount over tokens; V(s_T) = 0 after the last token (terminal);
- losses are token means over the batch (masked_mean), the convention of TRL's PPO
  trainer; the per-sequence mean of the GRPO paper is in rlhf/grpo_math.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from rlhf import kl as kl_lib


def check_bt(**arrays: jax.Array) -> tuple[int, int]:
    """Raise unless every named array is [B, T] with the same B and T; return (B, T)."""
    shapes = {name: tuple(a.shape) for name, a in arrays.items()}
    first = next(iter(shapes.values()))
    if len(first) != 2 or any(s != first for s in shapes.values()):
        raise ValueError(f"need equal [B, T] shapes, got {shapes}")
    return first


def check_prefix_mask(mask: jax.Array) -> None:
    """Raise when a concrete [B, T] mask is not 1…1 0…0 per row (no-op under jit)."""
    if isinstance(mask, jax.core.Tracer):
        return
    m = np.asarray(mask) > 0
    if np.any(m[:, 1:] & ~m[:, :-1]):
        raise ValueError("mask must be a prefix per row (1...1 0...0): a token follows a gap")


# ----------------------------------------------------------------------------- masked stats


def masked_sum(x: jax.Array, mask: jax.Array, axis: int | None = None) -> jax.Array:
    return jnp.sum(jnp.where(mask > 0, x, 0.0), axis=axis)


def masked_mean(x: jax.Array, mask: jax.Array, axis: int | None = None) -> jax.Array:
    """Mean of x over mask > 0 (0 when nothing is counted, not NaN)."""
    count = jnp.sum((mask > 0).astype(jnp.float32), axis=axis)
    return masked_sum(x, mask, axis) / jnp.maximum(count, 1.0)


def masked_var(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Population variance (ddof 0) of x over mask > 0."""
    mean = masked_mean(x, mask)
    return masked_mean(jnp.square(x - mean), mask)


def whiten(x: jax.Array, mask: jax.Array, shift_mean: bool = True, eps: float = 1e-8) -> jax.Array:
    """(x - mean) / sqrt(var + eps) over the masked entries of the whole batch; 0 off mask.

    shift_mean=False only rescales (keeps the mean), as for rewards in some PPO variants.
    Advantage whitening is batch-level (over all B·T response tokens), as in PPO2/TRL.
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return jnp.where(mask > 0, out, 0.0)


def explained_variance(values: jax.Array, returns: jax.Array, mask: jax.Array) -> jax.Array:
    """1 - Var[returns - values] / Var[returns] over masked tokens (1 = perfect critic)."""
    check_bt(values=values, returns=returns, mask=mask)
    var_returns = masked_var(returns, mask)
    return 1.0 - masked_var(returns - values, mask) / jnp.maximum(var_returns, 1e-8)


# ----------------------------------------------------------------------------- rewards


def last_token_index(mask: jax.Array) -> jax.Array:
    """[B, T] prefix mask -> [B] index of the last response token (0 for an empty row)."""
    return jnp.maximum(jnp.sum((mask > 0).astype(jnp.int32), axis=-1) - 1, 0)


def ended_with(tokens: jax.Array, mask: jax.Array, eos_id: int) -> jax.Array:
    """[B] bool: the response contains eos_id among its generated tokens."""
    check_bt(tokens=tokens, mask=mask)
    return jnp.any((tokens == eos_id) & (mask > 0), axis=-1)


def missing_eos_penalty(scores: jax.Array, ended: jax.Array, penalty: float) -> jax.Array:
    """scores [B] minus `penalty` where the response ran out of tokens before its eos.

    A truncated response is not a finished answer; without a penalty the policy can learn
    to ramble up to the token limit whenever the reward model likes partial text.
    (Subtracted, as TRL's `missing_eos_penalty`; use a large value to effectively replace.)
    """
    if scores.shape != ended.shape or scores.ndim != 1:
        raise ValueError(f"scores {scores.shape} and ended {ended.shape} must both be [B]")
    return jnp.where(ended, scores, scores - penalty)


def per_token_rewards(
    scores: jax.Array,
    log_probs: jax.Array,
    ref_log_probs: jax.Array,
    mask: jax.Array,
    beta: float | jax.Array,
    estimator: str = "k1",
) -> tuple[jax.Array, jax.Array]:
    """r_t = -β·KL_t + [t = last token]·score (Ziegler et al., 2019, eq. 2, per token).

    scores [B]: reward-model scores (normalized, eos penalty applied); log_probs,
    ref_log_probs [B, T]: the sampled tokens under π (at the sampling temperature) and
    π_ref; mask [B, T]. Returns (rewards [B, T], per-token KL [B, T]), both 0 off mask.
    """
    check_bt(log_probs=log_probs, ref_log_probs=ref_log_probs, mask=mask)
    if scores.shape != mask.shape[:1]:
        raise ValueError(f"scores {scores.shape} must be [B] for mask {mask.shape}")
    kl = jnp.where(mask > 0, kl_lib.kl_estimate(log_probs, ref_log_probs, estimator), 0.0)
    last = jax.nn.one_hot(last_token_index(mask), mask.shape[1], dtype=jnp.float32)
    rewards = -beta * kl + last * scores[:, None].astype(jnp.float32)
    return jnp.where(mask > 0, rewards, 0.0), kl


# ----------------------------------------------------------------------------- GAE


def gae(
    rewards: jax.Array, values: jax.Array, mask: jax.Array, gamma: float, lam: float
) -> tuple[jax.Array, jax.Array]:
    """Generalized advantage estimation (Schulman et al., 2016), backwards over T.

    δ_t = r_t + γ V_{t+1} - V_t,  A_t = δ_t + γλ A_{t+1},  returns R_t = A_t + V_t,
    with V_{t+1} = A_{t+1} = 0 past the last response token. rewards, values, mask
    [B, T] -> (advantages [B, T], returns [B, T]), 0 off mask.
    """
    check_bt(rewards=rewards, values=values, mask=mask)
    check_prefix_mask(mask)
    m = (mask > 0).astype(jnp.float32)
    r = rewards.astype(jnp.float32) * m
    v = values.astype(jnp.float32) * m
    next_v = jnp.pad(v[:, 1:], ((0, 0), (0, 1)))  # 0 past the end: masked v is 0
    next_m = jnp.pad(m[:, 1:], ((0, 0), (0, 1)))
    delta = r + gamma * next_v - v

    def step(next_adv: jax.Array, inputs: tuple[jax.Array, jax.Array]) -> tuple:
        d, cont = inputs
        adv = d + gamma * lam * cont * next_adv
        return adv, adv

    _, adv = jax.lax.scan(step, jnp.zeros(r.shape[0]), (delta.T, next_m.T), reverse=True)
    adv = adv.T * m
    return adv, (adv + v) * m


# ----------------------------------------------------------------------------- losses


def policy_loss(
    log_probs: jax.Array,
    old_log_probs: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    clip_eps: float,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """PPO clipped surrogate (Schulman et al., 2017, eq. 7), as a loss to minimize.

    ρ_t = exp(log π - log π_old);  L = mean_t max(-A_t ρ_t, -A_t clip(ρ_t, 1 ± ε)).
    All [B, T]. old_log_probs are the sampler's (same temperature as log_probs).
    Metrics: clip_fraction (tokens where the clipped term is the active one),
    approx_kl (mean k3 estimate of KL(π_old ‖ π) from the rollout samples), ratio
    mean and variance.
    """
    check_bt(log_probs=log_probs, old_log_probs=old_log_probs, advantages=advantages, mask=mask)
    log_ratio = log_probs - old_log_probs
    ratio = jnp.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(jnp.maximum(unclipped, clipped), mask)
    metrics = {
        "clip_fraction": masked_mean((clipped > unclipped).astype(jnp.float32), mask),
        "approx_kl": masked_mean(jnp.expm1(log_ratio) - log_ratio, mask),
        "ratio_mean": masked_mean(ratio, mask),
        "ratio_var": masked_var(ratio, mask),
    }
    return loss, metrics


def value_loss(
    values: jax.Array,
    old_values: jax.Array,
    returns: jax.Array,
    mask: jax.Array,
    clip_eps: float,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Clipped value loss (PPO2 baselines): ½ mean_t max((V - R)², (V_clip - R)²),

    V_clip = V_old + clip(V - V_old, ±ε). All [B, T]. Metric: value_clip_fraction.
    """
    check_bt(values=values, old_values=old_values, returns=returns, mask=mask)
    clipped_values = old_values + jnp.clip(values - old_values, -clip_eps, clip_eps)
    unclipped = jnp.square(values - returns)
    clipped = jnp.square(clipped_values - returns)
    loss = 0.5 * masked_mean(jnp.maximum(unclipped, clipped), mask)
    frac = masked_mean((clipped > unclipped).astype(jnp.float32), mask)
    return loss, {"value_clip_fraction": frac}


def entropy_from_logits(logits: jax.Array) -> jax.Array:
    """H = logsumexp(z) - Σ softmax(z)·z, logits [..., V] -> [...] nats, in fp32.

    Pass the logits at the sampling temperature (already divided by T, vocab limited)
    to get the entropy of the distribution the tokens are drawn from. Written without
    log_softmax so -inf logits (vocab limit) give 0·(-inf)-free sums.
    """
    z = logits.astype(jnp.float32)
    probs = jax.nn.softmax(z, axis=-1)
    finite = jnp.where(jnp.isfinite(z), z, 0.0)
    return jax.nn.logsumexp(z, axis=-1) - jnp.sum(probs * finite, axis=-1)
