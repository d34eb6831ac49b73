"""KL to the reference policy: per-token estimators and the β controllers.

Estimators (Schulman, "Approximating KL Divergence", 2020). Tokens are sampled from the
policy q = π; the reference is p = π_ref; r = p(x) / q(x), log r = log π_ref - log π.
KL(q ‖ p) = E_q[-log r] is then estimated per token by
- k1 = -log r = log π - log π_ref    unbiased, high variance, can be negative;
- k2 = ½ (log r)²                    biased (exact to second order), always >= 0;
- k3 = (r - 1) - log r               unbiased (E_q[r] = 1), always >= 0, low variance.
PPO-RLHF (Ziegler et al., 2019; InstructGPT) puts -β·k1 in the per-token reward; GRPO
(Shao et al., 2024) adds β·k3 to the loss.

Controllers (Ziegler et al., 2019, section 2.2): fixed β, or adaptive
    e_t = clip(KL_t / KL_target - 1, -0.2, 0.2),   β_{t+1} = β_t (1 + K_β e_t).
The paper fixes K_β = 0.1 per update; its code (openai/lm-human-preferences, and TRL
after it) uses K_β = n_steps / horizon, n_steps the number of responses KL_t was measured
on and horizon in the same unit, so the correction rate does not depend on the batch
size. We follow the code (the issue names target and horizon). Controllers are frozen dataclasses:
`update` returns a new one, so they can live in a train state or a checkpoint as plain
numbers.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

ESTIMATORS = ("k1", "k2", "k3")
# The adaptive controller's proportional error is clipped to this range (Ziegler et al.).
ERROR_CLIP = 0.2


def _check(log_probs: jax.Array, ref_log_probs: jax.Array) -> None:
    if log_probs.shape != ref_log_probs.shape:
        raise ValueError(
            f"log_probs {log_probs.shape} and ref_log_probs {ref_log_probs.shape} must have "
            "the same shape ([B, T] per-token log-probs of the same sampled tokens)"
        )


def kl_k1(log_probs: jax.Array, ref_log_probs: jax.Array) -> jax.Array:
    """k1 = log π - log π_ref per token ([B, T] -> [B, T]); unbiased for KL(π ‖ π_ref)."""
    _check(log_probs, ref_log_probs)
    return log_probs - ref_log_probs


def kl_k2(log_probs: jax.Array, ref_log_probs: jax.Array) -> jax.Array:
    """k2 = ½ (log π_ref - log π)² per token; >= 0, biased beyond second order."""
    _check(log_probs, ref_log_probs)
    return 0.5 * jnp.square(ref_log_probs - log_probs)


def kl_k3(log_probs: jax.Array, ref_log_probs: jax.Array) -> jax.Array:
    """k3 = exp(log r) - 1 - log r, log r = log π_ref - log π; unbiased and >= 0.

    `expm1` keeps it exact near r = 1, where the two terms nearly cancel.
    """
    _check(log_probs, ref_log_probs)
    log_ratio = ref_log_probs - log_probs
    return jnp.expm1(log_ratio) - log_ratio


def kl_estimate(log_probs: jax.Array, ref_log_probs: jax.Array, estimator: str) -> jax.Array:
    """Per-token KL(π ‖ π_ref) by name: "k1", "k2" or "k3"."""
    if estimator == "k1":
        return kl_k1(log_probs, ref_log_probs)
    if estimator == "k2":
        return kl_k2(log_probs, ref_log_probs)
    if estimator == "k3":
        return kl_k3(log_probs, ref_log_probs)
    raise ValueError(f"kl estimator {estimator!r}: choose from {ESTIMATORS}")


def sequence_kl(per_token: jax.Array, mask: jax.Array) -> jax.Array:
    """Per-token KL [B, T] summed over the response tokens (mask [B, T]) -> [B] nats."""
    if per_token.shape != mask.shape:
        raise ValueError(f"per-token KL {per_token.shape} and mask {mask.shape} disagree")
    return jnp.sum(jnp.where(mask > 0, per_token, 0.0), axis=-1)


def adaptive_beta(beta: float, kl: float, target: float, horizon: float, n_steps: int) -> float:
    """One adaptive update: β (1 + clip(kl / target - 1, ±0.2) · n_steps / horizon).

    kl: the measured KL per response (nats, mean over the batch); n_steps: how many
    responses it was measured on; horizon: responses over which the error is corrected.
    """
    if target <= 0 or horizon <= 0:
        raise ValueError(f"adaptive KL: target={target} and horizon={horizon} must be > 0")
    error = min(max(kl / target - 1.0, -ERROR_CLIP), ERROR_CLIP)
    return beta * (1.0 + error * n_steps / horizon)


@dataclasses.dataclass(frozen=True)
class FixedKLController:
    """β that never changes."""

    value: float

    def update(self, kl: float, n_steps: int) -> FixedKLController:
        del kl, n_steps
        return self


@dataclasses.dataclass(frozen=True)
class AdaptiveKLController:
    """β driven towards a target KL per response (Ziegler et al., 2019)."""

    value: float
    target: float
    horizon: float

    def __post_init__(self) -> None:
        if self.value <= 0 or self.target <= 0 or self.horizon <= 0:
            raise ValueError(
                f"adaptive KL controller: value={self.value}, target={self.target}, "
                f"horizon={self.horizon} must all be > 0"
            )

    def update(self, kl: float, n_steps: int) -> AdaptiveKLController:
        beta = adaptive_beta(self.value, float(kl), self.target, self.horizon, n_steps)
        return dataclasses.replace(self, value=beta)


def make_kl_controller(
    beta: float, target: float | None = None, horizon: float = 10_000.0
) -> FixedKLController | AdaptiveKLController:
    """Fixed β when `target` is None (or 0), else adaptive starting at β."""
    if not target:
        return FixedKLController(beta)
    return AdaptiveKLController(beta, target, horizon)
