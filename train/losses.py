"""Pure loss functions shared by the training stages."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy(
    logits: jax.Array, targets: jax.Array, mask: jax.Array | None = None, z_loss: float = 0.0
) -> tuple[jax.Array, jax.Array]:
    """Masked next-token cross-entropy.

    logits: [B, T, V] (any float dtype; computed in fp32), targets: [B, T] int,
    mask: [B, T] (1 = the token counts). `z_loss` adds z_loss * log(Z)^2 per token (PaLM),
    which keeps the softmax normalizer near 1 in long low-precision runs.
    Returns (mean loss over counted tokens, number of counted tokens). The mean of an
    all-masked batch is 0, not NaN.
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {logits.shape} and targets {targets.shape} disagree on [B, T]")
    if mask is None:
        mask = jnp.ones(targets.shape, jnp.float32)
    if mask.shape != targets.shape:
        raise ValueError(f"mask {mask.shape} must have the shape of targets {targets.shape}")
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    per_token = log_z - target_logits + z_loss * jnp.square(log_z)
    mask = mask.astype(jnp.float32)
    count = jnp.sum(mask)
    return jnp.sum(per_token * mask) / jnp.maximum(count, 1.0), count
