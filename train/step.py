"""The language-model train step: pure `train_step(state, batch) -> (state, metrics)`.

A batch is a dict of [B, T] arrays: `inputs`, `targets`, `loss_mask`, and optionally
`positions` and `segment_ids` (packed documents). The step is jitted once with explicit
in/out shardings and the state donated; its RNG is fold_in(state.rng, state.step), so a
resumed run replays exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from jax.sharding import Mesh

from model import sharding as sh
from train import losses
from train.optim import accumulate_gradients, apply_gradients, trainable_value_and_grad
from train.state import TrainState, step_rng

Batch = dict[str, jax.Array]
StepFn = Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]


def lm_loss_fn(model: nn.Module, z_loss: float = 0.0) -> Callable:
    """(params, batch, rng) -> ((summed token loss, token count), grads)."""

    def summed_loss(params: Any, batch: Batch, rng: jax.Array) -> tuple[jax.Array, jax.Array]:
        out = model.apply(
            {"params": params},
            batch["inputs"],
            batch.get("positions"),
            batch.get("segment_ids"),
            deterministic=False,
            rngs={"dropout": rng},
        )
        mean, count = losses.cross_entropy(
            out.logits, batch["targets"], batch.get("loss_mask"), z_loss
        )
        return mean * count, count

    return trainable_value_and_grad(summed_loss, has_aux=True)


def keep_if_finite(
    loss: jax.Array, grad_norm: jax.Array, new: Any, old: Any
) -> tuple[Any, Any, jax.Array]:
    """The `skip` policy for non-finite updates: `new` (e.g. (params, opt_state)) when loss
    and gradient norm are finite, else `old`; returns (*chosen, skipped as int32 0/1)."""
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    chosen = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    return (*chosen, 1 - finite.astype(jnp.int32))


def make_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    lr_fn: optax.Schedule,
    grad_accum_steps: int = 1,
    z_loss: float = 0.0,
    skip_nonfinite: bool = False,
) -> StepFn:
    """The LM step. With `skip_nonfinite`, an update whose loss or gradient is NaN/inf is
    discarded (parameters and optimizer state kept) and reported as `skipped=1`."""
    grad_fn = lm_loss_fn(model, z_loss)

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        loss_sum, count, grads = accumulate_gradients(
            grad_fn, state.params, batch, step_rng(state), grad_accum_steps
        )
        scale = 1.0 / jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g * scale, grads)
        params, opt_state = apply_gradients(tx, state.params, state.opt_state, grads)
        loss = loss_sum * scale
        grad_norm = optax.tree.norm(grads)
        metrics = {
            "loss": loss,
            "num_tokens": count,
            "grad_norm": grad_norm,
            "lr": lr_fn(state.step),
        }
        if skip_nonfinite:
            params, opt_state, metrics["skipped"] = keep_if_finite(
                loss, grad_norm, (params, opt_state), (state.params, state.opt_state)
            )
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, metrics

    return train_step


def jit_train_step(step_fn: StepFn, shardings: TrainState, mesh: Mesh, rules: sh.Rules) -> StepFn:
    """Jit once with in/out shardings and donation; trace under the mesh and logical rules."""
    batch_sh = sh.batch_sharding(mesh, rules)
    jitted = jax.jit(
        step_fn,
        in_shardings=(shardings, batch_sh),
        out_shardings=(shardings, sh.replicated(mesh)),
        donate_argnums=0,
    )

    def call(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        with sh.sharding_context(mesh, rules):
            return jitted(state, batch)

    call.lower = lambda *a: _lower(jitted, mesh, rules, *a)  # type: ignore[attr-defined]
    return call


def _lower(jitted: Any, mesh: Mesh, rules: sh.Rules, *args: Any) -> Any:
    with sh.sharding_context(mesh, rules):
        return jitted.lower(*args)
