"""PPO learner pieces: forward passes over a rollout, scoring, experience, the jitted update.

Pure functions over a rollout (rlhf/rollout.py `Rollout`: prompts [B, P], response tokens
[B, N], mask [B, N]) for rlhf/ppo.py, which adds the stage around them. All per-token
arrays are [B, N], aligned with the sampler's output and 0 off the mask; the math is
rlhf/ppo_math.py and rlhf/kl.py. The state passed to `make_learn`'s function is any
struct with params, opt_state, value_params and value_opt_state (rlhf/ppo.py `PPOState`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from model.generate import SamplingConfig, join_completion, limit_vocab, token_log_probs
from model.transformer import Transformer
from rlhf import health
from rlhf import kl as kl_lib
from rlhf import ppo_math as pm
from rlhf import rollout as ro
from train.optim import apply_gradients, trainable_value_and_grad
from train.reward_losses import pool_rewards

Params = Any


class Experience(NamedTuple):
    """One rollout batch ready for learning; per-token arrays [B, N], 0 off the mask."""

    rollout: ro.Rollout
    old_log_probs: jax.Array  # learner log-probs of π_old at the sampling temperature
    old_values: jax.Array
    advantages: jax.Array
    returns: jax.Array


# ----------------------------------------------------------------------------- forward passes


def response_logits(
    model: Transformer, params: Params, rollout: ro.Rollout, sampling: SamplingConfig
) -> jax.Array:
    """[B, N, V] fp32 logits that predict the N response tokens, vocab-limited, divided by T.

    The layout and read positions of model/generate.py `completion_log_probs` (logits at
    P - 1 + t predict token t); kept as logits so the loss gets log-probs and entropy
    from one forward pass.
    """
    P = rollout.prompt_tokens.shape[1]
    joined, segments, positions = join_completion(
        rollout.prompt_tokens, rollout.prompt_segment_ids, rollout.output
    )
    logits = model.apply({"params": params}, joined, positions, segments).logits
    logits = limit_vocab(logits[:, P - 1 : -1].astype(jnp.float32), sampling.vocab_limit)
    return logits / sampling.temperature


def masked_log_probs(logits: jax.Array, rollout: ro.Rollout) -> jax.Array:
    """[B, N, V] tempered logits -> [B, N] log-probs of the response tokens, 0 off mask."""
    lp = token_log_probs(jax.nn.log_softmax(logits, axis=-1), rollout.tokens)
    return jnp.where(rollout.mask, lp, 0.0)


def response_scalars(model: Transformer, params: Params, rollout: ro.Rollout) -> jax.Array:
    """Scalar-head outputs [B, N]: index t read at P - 1 + t (the state before token t)."""
    P = rollout.prompt_tokens.shape[1]
    joined, segments, positions = join_completion(
        rollout.prompt_tokens, rollout.prompt_segment_ids, rollout.output
    )
    scalars = model.apply({"params": params}, joined, positions, segments).scalars
    return scalars[:, P - 1 :].astype(jnp.float32)  # [B, N + 1]


def reward_scores(model: Transformer, params: Params, rollout: ro.Rollout, pool: str) -> jax.Array:
    """Raw reward-model scores [B]: the scalar head over the response tokens, pooled as the
    reward model was trained (`pool`, train/reward.py `reward_pool`): the same read
    train/reward_losses.py `pool_rewards` makes on the same chat layout."""
    after = response_scalars(model, params, rollout)[:, 1:]  # index t: at token t
    return pool_rewards(after, rollout.mask, pool)


# ----------------------------------------------------------------------------- scoring


def score_rollout(
    models: dict[str, Transformer],
    sampling: SamplingConfig,
    pool: str,
    params: Params,
    ref_params: Params,
    value_params: Params,
    rm_params: Params,
    rollout: ro.Rollout,
) -> dict[str, jax.Array]:
    """The four forward passes over a rollout -> log_probs, ref_log_probs, values [B, N],
    raw_scores [B] (the reward model read by `pool`), entropy (mean per response token)."""
    logits = response_logits(models["policy"], params, rollout, sampling)
    ref_logits = response_logits(models["policy"], ref_params, rollout, sampling)
    values = response_scalars(models["value"], value_params, rollout)[:, :-1]
    return {
        "log_probs": masked_log_probs(logits, rollout),
        "ref_log_probs": masked_log_probs(ref_logits, rollout),
        "values": jnp.where(rollout.mask, values, 0.0),
        "raw_scores": reward_scores(models["reward"], rm_params, rollout, pool),
        "entropy": pm.masked_mean(pm.entropy_from_logits(logits), rollout.mask),
    }


def make_experience(
    scored: dict[str, jax.Array],
    rollout: ro.Rollout,
    beta: jax.Array,
    gain: float,
    bias: float,
    p: ml_collections.ConfigDict,
    estimator: str,
) -> tuple[Experience, dict[str, jax.Array]]:
    """Calibrated scores → per-token rewards → GAE → (whitened) advantages, plus metrics."""
    mask = rollout.mask
    scores = gain * scored["raw_scores"] + bias
    penalized = pm.missing_eos_penalty(scores, rollout.ended, p.missing_eos_penalty)
    rewards, kl = pm.per_token_rewards(
        penalized, scored["log_probs"], scored["ref_log_probs"], mask, beta, estimator
    )
    adv, returns = pm.gae(rewards, scored["values"], mask, p.gamma, p.lam)
    if p.whiten_advantages:
        adv = pm.whiten(adv, mask)
    exp = Experience(rollout, scored["log_probs"], scored["values"], adv, returns)
    metrics = {
        "rm_score": jnp.mean(scores),
        "reward": jnp.mean(penalized),
        "kl": jnp.mean(kl_lib.sequence_kl(kl, mask)),
        "entropy": scored["entropy"],
        "value_explained_variance": pm.explained_variance(scored["values"], returns, mask),
        "response_length": jnp.mean(jnp.sum(mask, axis=-1).astype(jnp.float32)),
        "eos_rate": jnp.mean(rollout.ended.astype(jnp.float32)),
    }
    return exp, metrics


# ----------------------------------------------------------------------------- learning


def ppo_loss(
    models: dict[str, Transformer],
    sampling: SamplingConfig,
    p: ml_collections.ConfigDict,
    params: Params,
    value_params: Params,
    mini: Experience,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """pg_loss + vf_coef·value_loss - ent_coef·entropy on one minibatch ([b, N] arrays)."""
    mask = mini.rollout.mask
    logits = response_logits(models["policy"], params, mini.rollout, sampling)
    log_probs = masked_log_probs(logits, mini.rollout)
    pg, pg_metrics = pm.policy_loss(
        log_probs, mini.old_log_probs, mini.advantages, mask, p.clip_eps
    )
    values = response_scalars(models["value"], value_params, mini.rollout)[:, :-1]
    values = jnp.where(mask, values, 0.0)
    vf, vf_metrics = pm.value_loss(values, mini.old_values, mini.returns, mask, p.value_clip_eps)
    entropy = pm.masked_mean(pm.entropy_from_logits(logits), mask)
    loss = pg + p.vf_coef * vf - p.ent_coef * entropy
    return loss, {"policy_loss": pg, "value_loss": vf, **pg_metrics, **vf_metrics}


def minibatch_indices(key: jax.Array, batch: int, epochs: int, minibatches: int) -> jax.Array:
    """[epochs·minibatches, batch/minibatches] row indices: a fresh permutation per epoch."""
    perms = [jax.random.permutation(jax.random.fold_in(key, e), batch) for e in range(epochs)]
    return jnp.stack(perms).reshape(epochs * minibatches, batch // minibatches)


def make_learn(
    models: dict[str, Transformer],
    sampling: SamplingConfig,
    p: ml_collections.ConfigDict,
    tx: optax.GradientTransformation,
    value_tx: optax.GradientTransformation,
) -> Any:
    """(state, experience, key) -> (state with params/values updated, mean metrics over
    the updates, plus the policy's update_norm over the whole iteration)."""
    grad_fn = trainable_value_and_grad(
        lambda w, v, mini: ppo_loss(models, sampling, p, w, v, mini), argnums=(0, 1), has_aux=True
    )

    def learn(state: Any, exp: Experience, key: jax.Array) -> tuple[Any, dict]:
        B = exp.rollout.mask.shape[0]
        order = minibatch_indices(key, B, p.epochs, p.minibatches)

        def update(carry: tuple, rows: jax.Array) -> tuple[tuple, dict]:
            params, opt_state, vparams, vopt_state = carry
            mini = jax.tree.map(lambda x: jnp.take(x, rows, axis=0), exp)
            (loss, metrics), (grads, vgrads) = grad_fn(params, vparams, mini)
            params, opt_state = apply_gradients(tx, params, opt_state, grads)
            vparams, vopt_state = apply_gradients(value_tx, vparams, vopt_state, vgrads)
            metrics |= {"loss": loss, "grad_norm": optax.tree.norm(grads)}
            metrics["value_grad_norm"] = optax.tree.norm(vgrads)
            return (params, opt_state, vparams, vopt_state), metrics

        init = (state.params, state.opt_state, state.value_params, state.value_opt_state)
        (params, opt_state, vparams, vopt_state), metrics = jax.lax.scan(update, init, order)
        new = state.replace(
            params=params, opt_state=opt_state, value_params=vparams, value_opt_state=vopt_state
        )
        metrics = jax.tree.map(jnp.mean, metrics)
        return new, {**metrics, "update_norm": health.update_norm(state.params, params)}

    return learn
