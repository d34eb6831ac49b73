"""Reward-model math: the reward read, the InstructGPT K-wise loss, ranking metrics, calibration.

`compute_rewards` is the reward read: the [B, K, T] responses of a batch as one [B*K, T]
forward pass, the scalar head pooled over each response's tokens (`pool_rewards`): read
at its last token, `<|end|>` (InstructGPT), or averaged over its tokens.

Shapes: B prompts, K response slots per prompt (padded; `response_mask` [B, K] says
which are real), T tokens. `ranks` [B, K] int: 0 = best, equal = tie, -1 = padding.
Pairs come from `train.data.pipelines.pair_mask`: pairs[b, i, j] = 1 when response i
beats response j; ties and padded responses give no pair.

Decisions:
- All pairs of a prompt sit in one batch element and share one forward pass of its K
  responses (InstructGPT, section 3.5: shuffling pairs across the dataset overfits).
  Each pair is weighted 1/C(K_b, 2), K_b = the prompt's real responses, so every prompt
  without ties weighs one unit whatever its K; a tied pair carries no preference and adds
  nothing (so a prompt with ties weighs a little less). The loss is averaged over prompts
  that have at least one pair; all-tied or padding rows count zero.
- Optional constant margin m: -log σ(r_better - r_worse - m) (Llama 2 uses a margin of
  this form to make the model separate responses by more than m).
- Optional centering: c * (mean reward of the prompt's responses)^2 per prompt, which
  pins the free offset of a Bradley–Terry model near zero (Eisenstein et al., 2023).
- Functions return sums and counts (not means), so gradient accumulation and
  multi-batch evaluation divide once by the total.
- The mean read exists because the last one can start dead: a small model's hidden
  state at `<|end|>` may be nearly the same for every response (SFT never trains what
  follows it), so the head gets almost no gradient. On the demo's char model, 9 reward
  models of docs/rlhf.md's grid that ended below 0.85 held-out accuracy, retrained with
  the mean read: mean accuracy 0.72 -> 0.86.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from train.data.pipelines import pair_mask


def _check(rewards: jax.Array, ranks: jax.Array, response_mask: jax.Array) -> None:
    if rewards.ndim != 2 or rewards.shape != ranks.shape or rewards.shape != response_mask.shape:
        raise ValueError(
            f"rewards {rewards.shape}, ranks {ranks.shape} and response_mask "
            f"{response_mask.shape} must all be [B, K]"
        )


POOLS = ("last", "mean")


def pool_rewards(values: jax.Array, mask: jax.Array, pool: str) -> jax.Array:
    """Per-token scalar-head values [..., T] -> one reward per row [...].

    `mask` marks the response's tokens (its content and `<|end|>`); only its last run
    counts, so the earlier assistant turns of a multi-turn prompt stay out. "last" reads
    the last marked token, "mean" averages the run. A row with no marked token reads 0
    (callers mask it out).
    """
    if pool not in POOLS:
        raise ValueError(f"reward pool {pool!r}: choose from {POOLS}")
    if values.shape != mask.shape:
        raise ValueError(f"values {values.shape} and mask {mask.shape} disagree")
    marked = mask > 0
    slots = jnp.arange(mask.shape[-1])
    last = jnp.max(jnp.where(marked, slots, -1), axis=-1, keepdims=True)
    if pool == "last":
        read = jnp.take_along_axis(values, jnp.maximum(last, 0), axis=-1)[..., 0]
        return jnp.where(last[..., 0] >= 0, read, 0.0)
    # Unmarked slots before a position, counted from the left: equal to the count at the
    # last marked token exactly on that token's run.
    gaps = jnp.cumsum(~marked, axis=-1)
    run = marked & (gaps == jnp.take_along_axis(gaps, jnp.maximum(last, 0), axis=-1))
    total = jnp.sum(jnp.where(run, values, 0.0), axis=-1)
    return total / jnp.maximum(jnp.sum(run, axis=-1), 1)


def compute_rewards(
    model: nn.Module,
    params: Any,
    batch: dict[str, jax.Array],
    pool: str,
    deterministic: bool = True,
    rng: jax.Array | None = None,
) -> jax.Array:
    """Ranked batch ([B, K, T] tokens/positions/segment_ids/completion_mask) -> rewards
    [B, K] fp32, the scalar head pooled by `pool_rewards`.

    `model` is a Transformer with its scalar head.
    The K responses of a prompt are one batch element; they are flattened to [B*K, T]
    for one forward pass. Padded responses get reward 0 (and no gradient).
    """
    B, K, T = batch["tokens"].shape
    keys = ("tokens", "positions", "segment_ids", "completion_mask")
    flat = {k: batch[k].reshape(B * K, T) for k in keys}
    out = model.apply(
        {"params": params},
        flat["tokens"],
        flat["positions"],
        flat["segment_ids"],
        deterministic=deterministic,
        rngs=None if rng is None else {"dropout": rng},
    )
    rewards = pool_rewards(out.scalars, flat["completion_mask"], pool).reshape(B, K)
    return jnp.where(batch["response_mask"] > 0, rewards, 0.0)


def pair_weights(response_mask: jax.Array) -> jax.Array:
    """[B, K] -> [B] weight 1/C(K_b, 2) of each pair of a prompt (0 when K_b < 2)."""
    k = jnp.sum(response_mask.astype(jnp.float32), axis=-1)
    pairs = k * (k - 1.0) / 2.0
    return jnp.where(pairs > 0, 1.0 / jnp.maximum(pairs, 1.0), 0.0)


def ranking_loss(
    rewards: jax.Array,
    ranks: jax.Array,
    response_mask: jax.Array,
    margin: float = 0.0,
    center_coef: float = 0.0,
) -> tuple[jax.Array, jax.Array]:
    """The K-wise loss. rewards [B, K] float, ranks [B, K] int, response_mask [B, K].

    Per prompt b: sum over pairs (i beats j) of -log σ(r_i - r_j - margin) / C(K_b, 2),
    plus center_coef * (mean_k r_bk)^2. Returns (sum over prompts with a pair, number of
    such prompts); the batch loss is the ratio. K = 2 is the Bradley–Terry loss.
    """
    _check(rewards, ranks, response_mask)
    rewards = rewards.astype(jnp.float32)
    mask = response_mask.astype(jnp.float32)
    pairs = pair_mask(ranks, mask).astype(jnp.float32)  # [B, K, K]
    diff = rewards[:, :, None] - rewards[:, None, :] - margin
    nll = jnp.where(pairs > 0, jax.nn.softplus(-diff), 0.0)  # -log σ(diff); no 0*inf
    per_prompt = jnp.sum(nll, axis=(1, 2)) * pair_weights(mask)
    counted = (jnp.sum(pairs, axis=(1, 2)) > 0).astype(jnp.float32)  # [B]
    if center_coef:
        mean = jnp.sum(jnp.where(mask > 0, rewards, 0.0), -1) / jnp.maximum(mask.sum(-1), 1.0)
        per_prompt = per_prompt + center_coef * jnp.square(mean)
    return jnp.sum(per_prompt * counted), jnp.sum(counted)


def bradley_terry_loss(chosen: jax.Array, rejected: jax.Array, margin: float = 0.0) -> jax.Array:
    """Mean -log σ(r_chosen - r_rejected - margin) over [B] pairs (the K = 2 case)."""
    return jnp.mean(jax.nn.softplus(-(chosen - rejected - margin)))


def kendall_tau(
    rewards: jax.Array, ranks: jax.Array, response_mask: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Kendall's τ-b per prompt between predicted rewards and the true ranking.

    τ_b = Σ_{i<j} sgn(r_i - r_j) sgn(s_i - s_j) / sqrt(Σ sgn(r_i - r_j)² · Σ sgn(s_i - s_j)²)
    with true scores s = -rank, over real responses (ties in either reduce the
    denominator, as in scipy.stats.kendalltau). Returns (τ [B], valid [B]); a prompt is
    invalid (τ = 0) when either side is all tied.
    """
    _check(rewards, ranks, response_mask)
    mask = response_mask.astype(jnp.float32)
    K = rewards.shape[1]
    upper = jnp.triu(jnp.ones((K, K), jnp.float32), k=1)
    both = mask[:, :, None] * mask[:, None, :] * upper  # [B, K, K] pairs i < j
    sx = jnp.sign(rewards[:, :, None] - rewards[:, None, :]).astype(jnp.float32)
    sy = jnp.sign(ranks[:, None, :] - ranks[:, :, None]).astype(jnp.float32)  # s = -rank
    num = jnp.sum(both * sx * sy, axis=(1, 2))
    den = jnp.sqrt(jnp.sum(both * sx * sx, axis=(1, 2)) * jnp.sum(both * sy * sy, axis=(1, 2)))
    valid = den > 0
    return jnp.where(valid, num / jnp.where(valid, den, 1.0), 0.0), valid.astype(jnp.float32)


def ranking_stats(
    rewards: jax.Array, ranks: jax.Array, response_mask: jax.Array
) -> dict[str, jax.Array]:
    """Sums for the ranking metrics of a batch (add over batches, then divide):

    pairs / correct (r_better > r_worse; an exact tie counts 1/2) -> pairwise accuracy;
    margin_sum (Σ r_better - r_worse) -> mean margin; tau_sum / tau_count -> mean τ-b;
    responses / reward_sum / reward_sq_sum -> reward mean and std.
    """
    _check(rewards, ranks, response_mask)
    rewards = rewards.astype(jnp.float32)
    mask = response_mask.astype(jnp.float32)
    pairs = pair_mask(ranks, mask).astype(jnp.float32)
    diff = rewards[:, :, None] - rewards[:, None, :]
    correct = jnp.where(diff > 0, 1.0, jnp.where(diff == 0, 0.5, 0.0))
    tau, valid = kendall_tau(rewards, ranks, mask)
    real = jnp.where(mask > 0, rewards, 0.0)
    return {
        "pairs": jnp.sum(pairs),
        "correct": jnp.sum(pairs * correct),
        "margin_sum": jnp.sum(jnp.where(pairs > 0, diff, 0.0)),
        "tau_sum": jnp.sum(tau * valid),
        "tau_count": jnp.sum(valid),
        "responses": jnp.sum(mask),
        "reward_sum": jnp.sum(real),
        "reward_sq_sum": jnp.sum(jnp.square(real)),
    }


def ranking_metrics(stats: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Summed `ranking_stats` -> pair_accuracy, margin, kendall_tau, reward_mean/std.

    Works on host floats and inside jit alike.
    """
    pairs = jnp.maximum(stats["pairs"], 1.0)
    n = jnp.maximum(stats["responses"], 1.0)
    mean = stats["reward_sum"] / n
    var = jnp.maximum(stats["reward_sq_sum"] / n - mean * mean, 0.0)
    return {
        f"{prefix}pair_accuracy": stats["correct"] / pairs,
        f"{prefix}margin": stats["margin_sum"] / pairs,
        f"{prefix}kendall_tau": stats["tau_sum"] / jnp.maximum(stats["tau_count"], 1.0),
        f"{prefix}reward_mean": mean,
        f"{prefix}reward_std": jnp.sqrt(var),
    }


def fit_gain_bias(rewards: jax.Array, min_std: float = 1e-6) -> tuple[float, float]:
    """(gain, bias) with gain * r + bias of mean 0 and std 1 over `rewards` [N].

    Population std (ddof 0). A degenerate sample (std < min_std) keeps gain 1 and only
    removes the mean, rather than blowing rewards up.
    """
    r = jnp.asarray(rewards, jnp.float32).reshape(-1)
    if r.size == 0:
        raise ValueError("fit_gain_bias: no rewards to fit")
    mean, std = float(jnp.mean(r)), float(jnp.std(r))
    gain = 1.0 / std if std >= min_std else 1.0
    return gain, -mean * gain
