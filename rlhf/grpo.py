"""`flaxlm grpo --config configs/grpo.py:PRESET --workdir DIR --config.init_from=SFT_RUN
--config.reward_from=REWARD_RUN --config.data.path=prompts.jsonl`.

Group Relative Policy Optimization (Shao et al., 2024, DeepSeekMath), outcome supervision:
- policy π and frozen reference π_ref both start from the SFT checkpoint (`init_from`);
  π_ref is read once into its own buffers and is never an output of anything;
- per iteration, `batch_size` prompts are each sampled G = `grpo.group_size` times
  (rows prompt-major: [B·G, P]); each response gets one score: the calibrated reward
  model (`grpo.reward=model`, gain·raw + bias as in PPO) or the task's hidden oracle
  on the decoded text (`grpo.reward=oracle`, the upper-bound reference), minus
  `grpo.missing_eos_penalty` when it hit the token limit;
- advantages are the scores normalized within each group (rlhf/grpo_math.py; no critic),
  the loss the clipped surrogate plus β·k3 KL to π_ref per token (`kl.beta`, fixed),
  over `grpo.epochs` passes of `grpo.minibatches` shuffled minibatches.

As in PPO (rlhf/ppo.py, whose rollout and scoring pieces this reuses): log-probs are of
the sampling distribution (temperature, vocab limit); the learner's recomputed log-probs
must match the sampler's (rlhf/rollout.py `check_log_probs`) and are the "old" ones of
the ratio; the iteration's RNG is fold_in(state.rng, step), so a resumed run replays
exactly. The checkpoint holds a plain TrainState (the policy).

Metrics per iteration: rm_score (calibrated, before the eos penalty; when a reward model
is loaded), oracle_score (when `task` is set), reward (the score learned from, after the
penalty), kl (k1 summed over the response vs π_ref, mean over B·G, before learning),
entropy, group_std (mean within-group std of the reward), zero_std_groups (fraction of
groups without signal), loss, grad_norm, clip_fraction, kl_k3 / response_kl_k3 (the
loss's KL term per token / per response), response_length, eos_rate, log_prob_gap,
update_norm (the policy's change over the iteration), time_rollout / time_scoring /
time_learning (seconds), time_rollout_share (the rollout's fraction). rlhf/health.py
checks them (`health.*`): no signal in any group, a stuck clip_fraction or a
response-length collapse warns; a zero update stops the run.
"""

from __future__ import annotations

import pathlib
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from configs import loader
from model import lora
from model import sharding as sh
from model.config import flops_per_token
from model.generate import SamplingConfig
from model.tokenizer import AnyTokenizer
from model.transformer import Transformer
from rlhf import health
from rlhf import kl as kl_lib
from rlhf import policy_stage as ps
from rlhf import ppo_learner as pl
from rlhf import ppo_math as pm
from rlhf import ppo_reward as pr
from rlhf import rollout as ro
from rlhf.grpo_math import group_advantages, grpo_loss
from train.optim import apply_gradients, trainable_value_and_grad
from train.parent import load_params
from train.reward import reward_model
from train.sft import (
    batch_multiple,
    init_state_from,
    make_tx,
    start_from_parent,
)
from train.stage import StageError, StageParts, begin_build, stage_main, stage_parts
from train.state import TrainState, abstract_sharded_params

Params = Any
REWARDS = pr.REWARD_SOURCES  # "model" | "oracle"
PROMPT_KEYS = ("tokens", "segment_ids", "positions")  # a prompts batch, [B, P] each


# ----------------------------------------------------------------------------- one iteration


class Experience(NamedTuple):
    """One group-sampled batch ready for learning; per-token arrays [B·G, N], 0 off mask."""

    rollout: ro.Rollout
    old_log_probs: jax.Array  # learner log-probs of π_old at the sampling temperature
    ref_log_probs: jax.Array
    advantages: jax.Array  # [B·G], one per response


def score_rollout(
    models: dict[str, Transformer],
    sampling: SamplingConfig,
    pool: str,
    params: Params,
    ref_params: Params,
    rm_params: Params | None,
    rollout: ro.Rollout,
) -> dict[str, jax.Array]:
    """log_probs, ref_log_probs [B, N], entropy (mean per token)[, raw_scores [B], the
    reward model read by `pool`]."""
    logits = pl.response_logits(models["policy"], params, rollout, sampling)
    ref_logits = pl.response_logits(models["policy"], ref_params, rollout, sampling)
    out = {
        "log_probs": pl.masked_log_probs(logits, rollout),
        "ref_log_probs": pl.masked_log_probs(ref_logits, rollout),
        "entropy": pm.masked_mean(pm.entropy_from_logits(logits), rollout.mask),
    }
    if rm_params is not None:
        out["raw_scores"] = pl.reward_scores(models["reward"], rm_params, rollout, pool)
    return out


def make_experience(
    scored: dict[str, jax.Array],
    rollout: ro.Rollout,
    scores: jax.Array,
    g: ml_collections.ConfigDict,
) -> tuple[Experience, dict[str, jax.Array]]:
    """Scores [B·G] → eos penalty → group advantages [B·G], plus the rollout's metrics."""
    mask = rollout.mask
    rewards = pm.missing_eos_penalty(scores, rollout.ended, g.missing_eos_penalty)
    grouped = rewards.reshape(-1, g.group_size)  # [B, G]: rows are prompt-major
    adv = group_advantages(grouped, scale_by_std=g.scale_by_std).reshape(-1)
    kl = kl_lib.kl_k1(scored["log_probs"], scored["ref_log_probs"])
    std = jnp.std(grouped, axis=1)
    metrics = {
        "reward": jnp.mean(rewards),
        "kl": jnp.mean(kl_lib.sequence_kl(kl, mask)),
        "entropy": scored["entropy"],
        "group_std": jnp.mean(std),
        "zero_std_groups": jnp.mean((std < 1e-6).astype(jnp.float32)),
        "response_length": jnp.mean(jnp.sum(mask, axis=-1).astype(jnp.float32)),
        "eos_rate": jnp.mean(rollout.ended.astype(jnp.float32)),
    }
    exp = Experience(rollout, scored["log_probs"], scored["ref_log_probs"], adv)
    return exp, metrics


def make_learn(
    policy: Transformer,
    sampling: SamplingConfig,
    g: ml_collections.ConfigDict,
    beta: float,
    tx: optax.GradientTransformation,
) -> Any:
    """(state, experience, key) -> (state updated and stepped, mean metrics over updates)."""

    def loss_fn(params: Params, mini: Experience) -> tuple[jax.Array, dict]:
        logits = pl.response_logits(policy, params, mini.rollout, sampling)
        log_probs = pl.masked_log_probs(logits, mini.rollout)
        return grpo_loss(
            log_probs,
            mini.old_log_probs,
            mini.ref_log_probs,
            mini.advantages,
            mini.rollout.mask,
            g.clip_eps,
            beta,
        )

    grad_fn = trainable_value_and_grad(loss_fn, has_aux=True)

    def learn(state: TrainState, exp: Experience, key: jax.Array) -> tuple[TrainState, dict]:
        order = pl.minibatch_indices(key, exp.advantages.shape[0], g.epochs, g.minibatches)

        def update(carry: tuple, rows: jax.Array) -> tuple[tuple, dict]:
            params, opt_state = carry
            mini = jax.tree.map(lambda x: jnp.take(x, rows, axis=0), exp)
            (loss, m), grads = grad_fn(params, mini)
            new_params, opt_state = apply_gradients(tx, params, opt_state, grads)
            metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
            metrics |= {"clip_fraction": m["clip_fraction"], "kl_k3": m["kl"]}
            metrics["response_kl_k3"] = m["response_kl"]  # "kl" is the rollout's k1
            return (new_params, opt_state), metrics

        (params, opt_state), metrics = jax.lax.scan(update, (state.params, state.opt_state), order)
        new = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        metrics = jax.tree.map(jnp.mean, metrics)
        return new, {**metrics, "update_norm": health.update_norm(state.params, params)}

    return learn


def make_grpo_step(
    config: ml_collections.ConfigDict,
    models: dict[str, Transformer],
    frozen: dict[str, Params],
    calibration: dict | None,
    sampling: SamplingConfig,
    tx: optax.GradientTransformation,
    shardings: TrainState,
    mesh: jax.sharding.Mesh,
    rules: sh.Rules,
    tokenizer: AnyTokenizer,
    task: Any = None,
) -> Any:
    """The loop's `train_step(state, prompt batch [B, P]) -> (state, metrics)`.

    `frozen` holds `ref` and, when a reward model is loaded, `reward`: arguments of the
    jitted scoring pass only, so they cannot change.
    """
    g = config.grpo
    pool = calibration["pool"] if calibration else "last"  # no reward model: unused
    score = jax.jit(lambda *a: score_rollout(models, sampling, pool, *a))
    experience = jax.jit(
        lambda scored, rollout, scores: make_experience(scored, rollout, scores, g)
    )
    learn = jax.jit(
        make_learn(models["policy"], sampling, g, config.kl.beta, tx),
        out_shardings=(shardings, sh.replicated(mesh)),
        donate_argnums=0,
    )
    gain, bias = (calibration["gain"], calibration["bias"]) if calibration else (1.0, 0.0)

    def train_step(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict]:
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        t0 = time.perf_counter()
        with sh.sharding_context(mesh, rules):
            groups = {k: jnp.repeat(batch[k], g.group_size, axis=0) for k in PROMPT_KEYS}
            rollout = ps.sample_rollout(
                models,
                state.params,
                groups,
                jax.random.fold_in(key, 0),
                g.max_new_tokens,
                sampling,
                mesh,
                rules,
                tokenizer,
            )
            jax.block_until_ready(rollout)
            t1 = time.perf_counter()
            scored = score(state.params, frozen["ref"], frozen.get("reward"), rollout)
            gap = ro.check_log_probs(
                rollout.log_probs, scored["log_probs"], rollout.mask, g.log_prob_atol
            )
            metrics: dict[str, float] = {}
            scores = {}
            if "raw_scores" in scored:
                scores["model"] = gain * scored["raw_scores"] + bias
                metrics["rm_score"] = float(jnp.mean(scores["model"]))
            if task is not None:
                oracle = pr.oracle_row_scores(task, tokenizer, rollout)
                scores["oracle"] = pr.to_mesh(oracle, mesh, rules)
                metrics["oracle_score"] = float(np.mean(oracle))
            exp, rollout_metrics = experience(scored, rollout, scores[g.reward])
            metrics |= {k: float(v) for k, v in jax.device_get(rollout_metrics).items()}
            t2 = time.perf_counter()
            state, learned = learn(state, exp, jax.random.fold_in(key, 1))
            jax.block_until_ready(learned)
            t3 = time.perf_counter()
        metrics |= {"log_prob_gap": gap}
        metrics |= ps.iteration_times(t0, t1, t2, t3)
        return state, {**metrics, **learned}

    return train_step


# ----------------------------------------------------------------------------- the stage


def validate(config: ml_collections.ConfigDict) -> None:
    g = config.grpo
    keys = ("epochs", "minibatches", "max_new_tokens", "clip_eps", "log_prob_atol")
    loader.check_positive(config, *(f"grpo.{k}" for k in keys))
    if g.group_size < 2:
        raise StageError(
            f"grpo.group_size={g.group_size}: must be >= 2 (advantages are relative to the "
            "other samples of the same prompt)"
        )
    if g.reward not in REWARDS:
        raise StageError(f"grpo.reward={g.reward!r}: choose from {REWARDS}")
    if g.reward == "oracle" and not config.task:
        raise StageError("grpo.reward=oracle needs task (the hidden oracle, e.g. addition)")
    if g.reward == "model" and not config.reward_from:
        raise StageError("reward_from is empty: grpo.reward=model needs a `flaxlm reward` run")
    if config.nonfinite != "stop" or config.grad_accum_steps != 1:
        raise StageError("grpo supports nonfinite=stop and grad_accum_steps=1 only")
    if (config.batch_size * g.group_size) % g.minibatches:
        raise StageError(
            f"batch_size x grpo.group_size = {config.batch_size * g.group_size} is not "
            f"divisible by grpo.minibatches={g.minibatches}"
        )
    if config.kl.beta < 0:
        raise StageError(f"kl.beta={config.kl.beta}: must be >= 0")
    health.check_config(config)
    ps.check_eval_source(config, "held-out prompts JSONL")
    ps.sampling_settings(config, stochastic="GRPO")


def build(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> StageParts:
    del workdir
    mesh, rules = begin_build(config, validate)
    parent, tokenizer, model_cfg = start_from_parent(config, "grpo")  # refuses non-policies
    g = config.grpo
    models = {"policy": lora.wrap(Transformer(model_cfg), lora.from_config(config))}
    total_len = config.seq_len + g.max_new_tokens
    configs = [("policy", model_cfg)]
    rm_parent, calibration = None, None
    if config.reward_from:
        rm_parent, rm_cfg, calibration = ps.load_reward_parent(config, tokenizer)
        models["reward"] = reward_model(rm_cfg)
        configs.append(("reward model", rm_cfg))
    ps.check_fits(total_len, "seq_len + grpo.max_new_tokens", configs)
    task = ps.task_of(config)
    sampling = ps.rollout_sampling(config, model_cfg, tokenizer)
    rollouts = config.batch_size * g.group_size
    if rollouts % batch_multiple(mesh, rules):
        raise StageError(
            f"batch_size x grpo.group_size = {rollouts} rollouts must be a multiple of the "
            f"{batch_multiple(mesh, rules)} ways the batch is split over devices"
        )
    tx, _ = make_tx(ps.updates_config(config, "grpo"))
    state, shardings = init_state_from(parent, models["policy"], tx, mesh, rules, config.seed)
    abstract = {k: abstract_sharded_params(m, mesh, rules) for k, m in models.items()}
    frozen = {"ref": load_params(parent, abstract["policy"])}
    lineage = parent.lineage("grpo")
    reward = None
    if rm_parent is not None:
        frozen["reward"] = load_params(rm_parent, abstract["reward"])
        reward = (models["reward"], frozen["reward"], calibration)
        lineage["reward_model"] = str(rm_parent.checkpoint)
    step = make_grpo_step(
        config, models, frozen, calibration, sampling, tx, shardings, mesh, rules, tokenizer, task
    )
    evaluate = ps.make_policy_evaluate(
        models["policy"],
        frozen["ref"],
        sampling,
        g.max_new_tokens,
        mesh,
        rules,
        tokenizer,
        task,
        reward,
    )
    return stage_parts(
        stage="grpo",
        config=config,
        model_cfg=model_cfg,
        tokenizer=tokenizer,
        lineage=lineage,
        model=models["policy"],
        state=state,
        shardings=shardings,
        train_step=health.monitored(step, config, "grpo", tokenizer),
        batches=ps.prompt_batches(config, tokenizer, mesh, rules),
        work_per_step=(rollouts * total_len, flops_per_token(model_cfg, total_len)),
        make_eval=lambda: ps.make_eval_fn(
            config, lambda st, b, k: evaluate(st.params, b, k), tokenizer, mesh, rules
        ),
        mesh=mesh,
        rules=rules,
        extras={"models": models, "frozen": frozen, "evaluate": evaluate},
    )


def main(argv: Sequence[str]) -> int:
    return stage_main("grpo", build, argv)
