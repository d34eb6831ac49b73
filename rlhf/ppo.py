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
rlhf/health.py, which checks these), time_rollout / time_scoring / time_learning (seconds).
"""

from __future__ import annotations

import pathlib
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import struct

from configs import loader
from model import lora
from model import sharding as sh
from model.config import ModelConfig, flops_per_token
from model.generate import Prompts, SamplingConfig
from model.tokenizer import AnyTokenizer
from model.transformer import Transformer
from rlhf import health
from rlhf import kl as kl_lib
from rlhf import ppo_learner as pl
from rlhf import ppo_reward as pr
from rlhf import rollout as ro
from rlhf.ppo_reward import oracle_score, prompt_texts  # noqa: F401  (public here too)
from rlhf.tasks import load_task
from train.data import pipelines
from train.parent import check_tokenizer, load_params, read_parent
from train.reward import load_calibration, reward_model
from train.sft import (
    data_options,
    init_state_from,
    make_tx,
    open_records,
    start_from_parent,
)
from train.stage import (
    REWARD_FROM_KIND,
    StageError,
    check_parent_kind,
    loop_settings,
    stage_main,
    stage_parts,
)
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


def sample_rollout(
    models: dict[str, Transformer],
    params: Params,
    batch: dict[str, jax.Array],
    key: jax.Array,
    max_new_tokens: int,
    sampling: SamplingConfig,
    mesh: jax.sharding.Mesh,
    rules: sh.Rules,
    tokenizer: AnyTokenizer,
) -> ro.Rollout:
    """One response per row of a prompt batch (`tokens`, `segment_ids`, `positions` [B, P]),
    ending at the tokenizer's end of turn."""
    prompts = Prompts(batch["tokens"], batch["segment_ids"], batch["positions"])
    return ro.sample(
        models["policy"],
        params,
        prompts,
        key,
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        mesh=mesh,
        rules=rules,
        stop_id=tokenizer.end_of_turn_id,
        pad_id=tokenizer.pad_id,
    )


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
    score = jax.jit(lambda *a: pl.score_rollout(models, sampling, *a))
    gain, bias = float(calibration["gain"]), float(calibration["bias"])

    def evaluate(state: PPOState, batch: dict[str, jax.Array], key: jax.Array) -> dict:
        with sh.sharding_context(mesh, rules):
            rollout = sample_rollout(
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
    score = jax.jit(lambda *a: pl.score_rollout(models, sampling, *a))
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
            rollout = sample_rollout(
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
        metrics |= {"time_rollout": t1 - t0, "time_scoring": t2 - t1, "time_learning": t3 - t2}
        return state, {**metrics, **learned}

    return train_step


# ----------------------------------------------------------------------------- the stage


def make_eval_fn(
    config: ml_collections.ConfigDict,
    evaluate: Any,
    tokenizer: AnyTokenizer,
    mesh: jax.sharding.Mesh,
    rules: sh.Rules,
) -> Any:
    """state -> eval_* metrics of `evaluate` on the first `eval.batch_size` (default
    `batch_size`) held-out prompts (`eval.path`), cycled to fill the batch, fixed key."""
    source = open_records(config, "eval", "prompts")
    if len(source) == 0:
        raise StageError("eval: the held-out prompt set is empty")
    size = config.eval.batch_size or config.batch_size
    rows = [
        pipelines.tokenize_prompt(source[i % len(source)], tokenizer, config.seq_len)
        for i in range(size)
    ]
    sharding = sh.batch_sharding(mesh, rules)
    batch = {k: jax.device_put(np.stack([r[k] for r in rows]), sharding) for k in rows[0]}
    key = jax.random.key(config.seed + 1)

    def eval_fn(state: PPOState) -> dict[str, float]:
        return {f"eval_{k}": v for k, v in evaluate(state, batch, key).items()}

    return eval_fn


def validate(config: ml_collections.ConfigDict) -> None:
    p, k, s = config.ppo, config.kl, config.sampling
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
    try:
        sampling = SamplingConfig(s.temperature, s.top_k, s.top_p)
    except ValueError as err:
        raise StageError(f"sampling: {err}") from None
    if sampling.greedy:
        raise StageError("sampling.temperature=0 (greedy): PPO needs a stochastic policy")
    health.check_config(config)
    if not config.reward_from:
        raise StageError("reward_from is empty: PPO needs a `flaxlm reward` run")
    reward = p.get("reward", "model")
    if reward not in pr.REWARD_SOURCES:
        raise StageError(f"ppo.reward={reward!r}: choose from {pr.REWARD_SOURCES}")
    if reward == "oracle" and not config.task:
        raise StageError("ppo.reward=oracle needs task (e.g. --config.task=addition)")


def updates_config(config: ml_collections.ConfigDict, lr: float) -> ml_collections.ConfigDict:
    """`config` for train/sft.py `make_tx` with the schedule counted in optimizer updates
    (epochs x minibatches per iteration) and learning rate `lr`."""
    c = ml_collections.ConfigDict(config.to_dict())
    per_iteration = config.ppo.epochs * config.ppo.minibatches
    c.total_steps *= per_iteration
    c.optim.warmup_steps *= per_iteration
    c.optim.lr = lr
    return c


def load_reward_parent(config: ml_collections.ConfigDict, tokenizer: AnyTokenizer) -> tuple:
    """(parent, model config, calibration) of `reward_from`; refuses non-reward or
    uncalibrated checkpoints and another tokenizer."""
    rm_parent = read_parent(config.reward_from)
    check_parent_kind(rm_parent, "reward_from", REWARD_FROM_KIND)
    check_tokenizer(rm_parent, tokenizer.fingerprint, "the policy's tokenizer")
    calibration = load_calibration(rm_parent.workdir)
    if calibration is None or calibration.get("step") != rm_parent.step:
        raise StageError(
            f"reward_from={rm_parent.workdir} has no calibration for step {rm_parent.step}; "
            "rerun `flaxlm reward` with calibration.num_samples > 0"
        )
    return rm_parent, ModelConfig(**rm_parent.model), calibration


def build(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> dict[str, Any]:
    del workdir
    validate(config)
    mesh = sh.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    rules = sh.get_rules(config.mesh.strategy)
    parent, tokenizer, model_cfg = start_from_parent(config, "ppo")
    rm_parent, rm_cfg, calibration = load_reward_parent(config, tokenizer)
    total_len = config.seq_len + config.ppo.max_new_tokens
    for name, cfg in (("policy", model_cfg), ("reward model", rm_cfg)):
        if total_len > cfg.max_seq_len:
            raise StageError(
                f"seq_len + ppo.max_new_tokens = {total_len} exceeds the {name}'s "
                f"max_seq_len={cfg.max_seq_len}"
            )
    task = load_task(config.task) if config.task else None
    s = config.sampling
    sampling = ro.sampling_for(
        SamplingConfig(s.temperature, s.top_k, s.top_p), model_cfg.vocab_size, tokenizer
    )
    source = open_records(config, "data", "prompts")
    options = data_options(config, mesh, rules, train=True)
    batches = iter(
        pipelines.prompts_dataset(
            source,
            tokenizer,
            pipelines.local_batch_size(config.batch_size, options.shard_count),
            config.seq_len,
            options,
        )
    )
    adapters = lora.from_config(config)  # LoRA on the policy and the value model alike
    models = {
        "policy": lora.wrap(Transformer(model_cfg), adapters),
        "value": lora.wrap(reward_model(rm_cfg), adapters),
    }
    models["reward"] = models["value"]
    tx, _ = make_tx(updates_config(config, config.optim.lr))
    value_tx, _ = make_tx(updates_config(config, config.ppo.value_lr))
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
    frozen = {
        "ref": load_params(parent, abstract_sharded_params(models["policy"], mesh, rules)),
        "reward": load_params(rm_parent, abstract_sharded_params(models["reward"], mesh, rules)),
    }
    scoring = make_scoring(
        config, models, frozen, calibration, sampling, mesh, rules, tokenizer, task
    )
    step = make_ppo_step(
        config,
        models,
        frozen,
        calibration,
        sampling,
        (tx, value_tx),
        shardings,
        mesh,
        rules,
        tokenizer,
        task,
        scoring,
    )
    step = health.monitored(step, config, "ppo", tokenizer)
    evaluate = make_evaluate(
        config, models, frozen, calibration, sampling, mesh, rules, tokenizer, task
    )
    eval_fn = None
    if config.eval.every_steps:
        eval_fn = make_eval_fn(config, evaluate, tokenizer, mesh, rules)
    settings = loop_settings(
        config, "ppo", config.batch_size * total_len, flops_per_token(model_cfg, total_len)
    )
    parts = stage_parts(
        stage="ppo",
        config=config,
        model_cfg=model_cfg,
        tokenizer=tokenizer,
        lineage={**parent.lineage("ppo"), "reward_model": str(rm_parent.checkpoint)},
        model=models["policy"],
        state=state,
        shardings=shardings,
        train_step=step,
        batches=batches,
        settings=settings,
        eval_fn=eval_fn,
        mesh=mesh,
        rules=rules,
        extra_meta={"value_model": rm_cfg.to_dict()},
    )
    # For tests and tools: "scoring" is (state, rollout, β) -> (scored, Experience, metrics,
    # last-token scores [B]), the step's scoring half; "sampling" the rollouts' settings.
    extra = {"models": models, "frozen": frozen, "evaluate": evaluate, "scoring": scoring}
    return {**parts, **extra, "sampling": sampling, "task": task}


def main(argv: Sequence[str]) -> int:
    return stage_main("ppo", build, argv)
