"""`flaxlm ppo --config configs/ppo.py:PRESET --workdir DIR --config.init_from=SFT_RUN
--config.reward_from=REWARD_RUN --config.data.path=prompts.jsonl`.

RLHF with PPO (Ziegler et al., 2019; Stiennon et al., 2020; Ouyang et al., 2022):
- policy π and frozen reference π_ref both start from the SFT checkpoint (`init_from`);
  π_ref is read once into its own buffers and never updated or checkpointed;
- the value model is the reward model's architecture (scalar head, no LM head) started
  from the reward checkpoint (`reward_from`); the reward model itself is frozen;
- reward per token r_t = -β·(log π - log π_ref)_t, plus at the last response token the
  calibrated reward-model score gain·raw + bias (train/reward.py `load_calibration`), or
  with `ppo.reward=oracle` the task's oracle score of the decoded response (an upper
  reference; rlhf/ppo_reward.py), minus `ppo.missing_eos_penalty` when the response hit
  the token limit;
- β fixed (`kl.target` 0) or adaptive (rlhf/kl.py), kept in the train state as `kl_coef`;
- GAE, batch-level advantage whitening, clipped policy and value losses (rlhf/ppo_math.py),
  `ppo.epochs` passes over `ppo.minibatches` shuffled minibatches per rollout batch.

One loop step (train/loop.py) is one PPO iteration on a batch of [B, P] prompts:
rollout (model/generate.py through rlhf/rollout.py, jitted) → scoring (one jitted pass of
policy, reference, value and reward models over prompt + response) → learning (one jitted
scan over the minibatch updates, state donated). The iteration's RNG is
fold_in(state.rng, step), so a resumed run replays exactly.

Temperature. Every log-prob of π and π_ref (ratio, KL, entropy) is of
log_softmax(limit_vocab(logits) / T), the distribution the sampler draws from. The
learner's recomputed log-probs are checked against the sampler's on every iteration
(rlhf/rollout.py `check_log_probs`, tolerance `ppo.log_prob_atol`); they, not the
sampler's, are the "old" log-probs of the ratio (equal within the tolerance, and exactly
the function the loss differentiates). top-k / top-p truncation is allowed but makes
the sampler's distribution differ from the one scored (the sampler's log-probs are
pre-truncation), so the defaults leave it off. Every forward pass is deterministic
(no dropout), so sampler, learner and reference score the same function.

Metrics per iteration (metrics.jsonl): rm_score (calibrated, before the eos penalty;
the reward model's even when the oracle is the reward), reward (the last-token score
after the eos penalty), oracle_score (when `task` is set; computed from decoded text on
the host, seen by the learner only with `ppo.reward=oracle`), kl (k1 summed over the
response, mean over B), kl_coef, entropy, policy_loss, value_loss, clip_fraction,
approx_kl, ratio_mean, ratio_var, value_explained_variance (the rollout's values vs. GAE
returns), response_length, eos_rate, log_prob_gap, update_norm (the policy's change; see
rlhf/health.py, which checks these), time_rollout / time_scoring / time_learning (seconds)
and time_rollout_share (the rollout's fraction of the iteration).
"""

from __future__ import annotations

import pathlib
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import struct

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
from rlhf import ppo_reward as pr
from rlhf import rollout as ro
from rlhf.ppo_reward import oracle_score, prompt_texts  # noqa: F401  (public here too)
from train.parent import load_params
from train.reward import reward_model
from train.sft import (
    init_state_from,
    make_tx,
    start_from_parent,
)
from train.stage import StageError, StageParts, begin_build, stage_main, stage_parts
from train.state import abstract_sharded_params

Params = Any


class PPOState(struct.PyTreeNode):
    """What a PPO checkpoint holds. `params` is the policy (so sample/chat/init_from read it)."""

    step: jax.Array  # int32: PPO iterations done
    params: Params  # policy
    opt_state: Any
    value_params: Params
    value_opt_state: Any
    kl_coef: jax.Array  # fp32 β: the KL controller's state
    rng: jax.Array  # uint32[2] raw key data


# ----------------------------------------------------------------------------- one iteration


def make_evaluate(
    config: ml_collections.ConfigDict,
    models: dict[str, Transformer],
    frozen: dict[str, Params],
    calibration: dict,
    sampling: SamplingConfig,
    mesh: jax.sharding.Mesh,
    rules: sh.Rules,
    tokenizer: AnyTokenizer,
    task: Any = None,
) -> Any:
    """(state, prompt batch, key) -> {rm_score, kl, response_length, eos_rate[, oracle_score]}.

    Samples one response per row with the state's policy and scores it against the frozen
    reference and reward model, without learning: held-out measurements of a policy
    (SFT = the initial state) at the training temperature.
    """
    score = jax.jit(lambda *a: pl.score_rollout(models, sampling, calibration["pool"], *a))
    gain, bias = float(calibration["gain"]), float(calibration["bias"])

    def evaluate(state: PPOState, batch: dict[str, jax.Array], key: jax.Array) -> dict:
        with sh.sharding_context(mesh, rules):
            rollout = ps.sample_rollout(
                models,
                state.params,
                batch,
                key,
                config.ppo.max_new_tokens,
                sampling,
                mesh,
                rules,
                tokenizer,
            )
            scored = score(
                state.params, frozen["ref"], state.value_params, frozen["reward"], rollout
            )
        kl = kl_lib.kl_k1(scored["log_probs"], scored["ref_log_probs"])
        metrics = {
            "rm_score": jnp.mean(gain * scored["raw_scores"] + bias),
            "kl": jnp.mean(kl_lib.sequence_kl(kl, rollout.mask)),
            "response_length": jnp.mean(jnp.sum(rollout.mask, axis=-1).astype(jnp.float32)),
            "eos_rate": jnp.mean(rollout.ended.astype(jnp.float32)),
        }
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if task is not None:
            metrics["oracle_score"] = oracle_score(task, tokenizer, rollout)
        return metrics

    return evaluate


def make_scoring(
    config: ml_collections.ConfigDict,
    models: dict[str, Transformer],
    frozen: dict[str, Params],
    calibration: dict,
    sampling: SamplingConfig,
    mesh: jax.sharding.Mesh,
    rules: sh.Rules,
    tokenizer: AnyTokenizer,
    task: Any = None,
) -> Any:
    """(state, rollout, β) -> (scored, Experience, metrics, last-token scores [B]).

    The scoring half of an iteration: the jitted forward passes (rlhf/ppo_learner.py
    `score_rollout`), the sampler/learner log-prob check (its gap in the metrics as
    log_prob_gap), then rewards and GAE with the score `ppo.reward` names
    (rlhf/ppo_reward.py). `frozen` holds `ref` (π_ref) and `reward` parameters.
    """
    score = jax.jit(lambda *a: pl.score_rollout(models, sampling, calibration["pool"], *a))
    experience = pr.make_experience_fn(config, calibration, tokenizer, mesh, rules, task)

    def scoring(state: PPOState, rollout: ro.Rollout, beta: jax.Array) -> tuple:
        with sh.sharding_context(mesh, rules):
            scored = score(
                state.params, frozen["ref"], state.value_params, frozen["reward"], rollout
            )
            gap = ro.check_log_probs(
                rollout.log_probs, scored["log_probs"], rollout.mask, config.ppo.log_prob_atol
            )
            exp, metrics, scores = experience(scored, rollout, beta)
        return scored, exp, metrics | {"log_prob_gap": gap}, scores

    return scoring


def make_ppo_step(
    config: ml_collections.ConfigDict,
    models: dict[str, Transformer],
    frozen: dict[str, Params],
    calibration: dict,
    sampling: SamplingConfig,
    txs: tuple[optax.GradientTransformation, optax.GradientTransformation],
    shardings: PPOState,
    mesh: jax.sharding.Mesh,
    rules: sh.Rules,
    tokenizer: AnyTokenizer,
    task: Any = None,
    scoring: Any = None,
) -> Any:
    """The loop's `train_step(state, prompt batch) -> (state, metrics)` for one iteration.

    `frozen` holds `ref` (π_ref) and `reward` parameters; they are arguments of the jitted
    scoring pass, never outputs of anything, so they cannot change. `scoring`: a
    `make_scoring` function to share (one compilation), else a new one.
    """
    p = config.ppo
    if scoring is None:
        scoring = make_scoring(
            config, models, frozen, calibration, sampling, mesh, rules, tokenizer, task
        )
    learn_fn = pl.make_learn(models, sampling, p, *txs)

    def learn_and_advance(state: PPOState, exp: pl.Experience, key: jax.Array, beta: jax.Array):
        state, metrics = learn_fn(state, exp, key)
        return state.replace(step=state.step + 1, kl_coef=beta), metrics

    learn = jax.jit(
        learn_and_advance,
        out_shardings=(shardings, sh.replicated(mesh)),
        donate_argnums=0,
    )

    def train_step(state: PPOState, batch: dict[str, jax.Array]) -> tuple[PPOState, dict]:
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        beta = state.kl_coef
        t0 = time.perf_counter()
        with sh.sharding_context(mesh, rules):
            rollout = ps.sample_rollout(
                models,
                state.params,
                batch,
                jax.random.fold_in(key, 0),
                p.max_new_tokens,
                sampling,
                mesh,
                rules,
                tokenizer,
            )
            jax.block_until_ready(rollout)
        t1 = time.perf_counter()
        _, exp, metrics, _ = scoring(state, rollout, beta)
        t2 = time.perf_counter()
        B = int(rollout.mask.shape[0])
        controller = kl_lib.make_kl_controller(float(beta), config.kl.target, config.kl.horizon)
        new_beta = jnp.float32(controller.update(metrics["kl"], B).value)
        with sh.sharding_context(mesh, rules):
            state, learned = learn(state, exp, jax.random.fold_in(key, 1), new_beta)
            jax.block_until_ready(learned)
        t3 = time.perf_counter()
        metrics |= {"kl_coef": float(beta)}
        metrics |= ps.iteration_times(t0, t1, t2, t3)
        return state, {**metrics, **learned}

    return train_step


# ----------------------------------------------------------------------------- the stage


def validate(config: ml_collections.ConfigDict) -> None:
    p, k = config.ppo, config.kl
    loader.check_positive(
        config, "ppo.epochs", "ppo.minibatches", "ppo.max_new_tokens", "ppo.clip_eps"
    )
    loader.check_positive(config, "ppo.value_clip_eps", "ppo.value_lr", "ppo.log_prob_atol")
    if config.nonfinite != "stop" or config.grad_accum_steps != 1:
        raise StageError("ppo supports nonfinite=stop and grad_accum_steps=1 only")
    if config.batch_size % p.minibatches:
        raise StageError(
            f"batch_size={config.batch_size} is not divisible by ppo.minibatches={p.minibatches}"
        )
    if not (0.0 <= p.gamma <= 1.0 and 0.0 <= p.lam <= 1.0):
        raise StageError(f"ppo.gamma={p.gamma} and ppo.lam={p.lam} must be in [0, 1]")
    if k.estimator not in kl_lib.ESTIMATORS:
        raise StageError(f"kl.estimator={k.estimator!r}: choose from {kl_lib.ESTIMATORS}")
    if k.beta < 0 or k.target < 0 or (k.target and (k.beta <= 0 or k.horizon <= 0)):
        raise StageError("kl.beta, kl.target must be >= 0; adaptive KL needs beta, horizon > 0")
    ps.sampling_settings(config, stochastic="PPO")
    health.check_config(config)
    if not config.reward_from:
        raise StageError("reward_from is empty: PPO needs a `flaxlm reward` run")
    reward = p.get("reward", "model")
    if reward not in pr.REWARD_SOURCES:
        raise StageError(f"ppo.reward={reward!r}: choose from {pr.REWARD_SOURCES}")
    if reward == "oracle" and not config.task:
        raise StageError("ppo.reward=oracle needs task (e.g. --config.task=addition)")


def build(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> StageParts:
    del workdir
    mesh, rules = begin_build(config, validate)
    parent, tokenizer, model_cfg = start_from_parent(config, "ppo")
    rm_parent, rm_cfg, calibration = ps.load_reward_parent(config, tokenizer)
    total_len = config.seq_len + config.ppo.max_new_tokens
    ps.check_fits(
        total_len, "seq_len + ppo.max_new_tokens", [("policy", model_cfg), ("reward model", rm_cfg)]
    )
    task = ps.task_of(config)
    sampling = ps.rollout_sampling(config, model_cfg, tokenizer)
    adapters = lora.from_config(config)  # LoRA on the policy and the value model alike
    models = {
        "policy": lora.wrap(Transformer(model_cfg), adapters),
        "value": lora.wrap(reward_model(rm_cfg), adapters),
    }
    models["reward"] = models["value"]
    state, shardings, txs = init_ppo_state(config, models, parent, rm_parent, mesh, rules)
    frozen = {
        "ref": load_params(parent, abstract_sharded_params(models["policy"], mesh, rules)),
        "reward": load_params(rm_parent, abstract_sharded_params(models["reward"], mesh, rules)),
    }
    shared = (config, models, frozen, calibration, sampling)
    scoring = make_scoring(*shared, mesh, rules, tokenizer, task)
    step = make_ppo_step(*shared, txs, shardings, mesh, rules, tokenizer, task, scoring)
    evaluate = make_evaluate(*shared, mesh, rules, tokenizer, task)
    # For tests and tools: "scoring" is (state, rollout, β) -> (scored, Experience, metrics,
    # last-token scores [B]), the step's scoring half; "sampling" the rollouts' settings.
    extras = {"models": models, "frozen": frozen, "evaluate": evaluate, "scoring": scoring}
    return stage_parts(
        stage="ppo",
        config=config,
        model_cfg=model_cfg,
        tokenizer=tokenizer,
        lineage={**parent.lineage("ppo"), "reward_model": str(rm_parent.checkpoint)},
        model=models["policy"],
        state=state,
        shardings=shardings,
        train_step=health.monitored(step, config, "ppo", tokenizer),
        batches=ps.prompt_batches(config, tokenizer, mesh, rules),
        work_per_step=(config.batch_size * total_len, flops_per_token(model_cfg, total_len)),
        make_eval=lambda: ps.make_eval_fn(config, evaluate, tokenizer, mesh, rules),
        mesh=mesh,
        rules=rules,
        extra_meta={"value_model": rm_cfg.to_dict()},
        extras={**extras, "sampling": sampling, "task": task, "calibration": calibration},
    )


def init_ppo_state(
    config: ml_collections.ConfigDict,
    models: dict[str, Any],
    parent: Any,
    rm_parent: Any,
    mesh: jax.sharding.Mesh,
    rules: sh.Rules,
) -> tuple[PPOState, PPOState, tuple[Any, Any]]:
    """(state, its shardings, (policy tx, value tx)): the policy from `parent`, the value
    model from the reward model `rm_parent`, β at kl.beta."""
    tx, _ = make_tx(ps.updates_config(config, "ppo", config.optim.lr))
    value_tx, _ = make_tx(ps.updates_config(config, "ppo", config.ppo.value_lr))
    policy, policy_sh = init_state_from(parent, models["policy"], tx, mesh, rules, config.seed)
    value, value_sh = init_state_from(rm_parent, models["value"], value_tx, mesh, rules, 0)
    replicated = sh.replicated(mesh)
    state = PPOState(
        step=policy.step,
        params=policy.params,
        opt_state=policy.opt_state,
        value_params=value.params,
        value_opt_state=value.opt_state,
        kl_coef=jax.device_put(jnp.float32(config.kl.beta), replicated),
        rng=policy.rng,
    )
    shardings = PPOState(
        step=replicated,
        params=policy_sh.params,
        opt_state=policy_sh.opt_state,
        value_params=value_sh.params,
        value_opt_state=value_sh.opt_state,
        kl_coef=replicated,
        rng=replicated,
    )
    return state, shardings, (tx, value_tx)


def main(argv: Sequence[str]) -> int:
    return stage_main("ppo", build, argv)
