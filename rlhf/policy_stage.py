"""What the policy stages (PPO, GRPO, DPO) share: rollout sampling, the reward model
they read, held-out policy eval, the prompt batches and the checks around them.

One module, so that no policy stage imports another for its pieces.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from model import sharding as sh
from model.config import ModelConfig
from model.generate import Prompts, SamplingConfig
from model.tokenizer import AnyTokenizer
from model.transformer import Transformer
from rlhf import kl as kl_lib
from rlhf import ppo_learner as pl
from rlhf import ppo_reward as pr
from rlhf import rollout as ro
from rlhf.tasks import load_task
from train.data import pipelines
from train.parent import check_tokenizer, read_parent
from train.reward import load_calibration, reward_pool
from train.sft import data_options, open_records
from train.stage import REWARD_FROM_KIND, StageError, check_parent_kind

Params = Any


def sampling_settings(config: ml_collections.ConfigDict, stochastic: str = "") -> SamplingConfig:
    """The `sampling` section, checked; `stochastic` names a stage that refuses greedy."""
    s = config.sampling
    try:
        sampling = SamplingConfig(s.temperature, s.top_k, s.top_p, decode_impl=s.decode_impl)
    except ValueError as err:
        raise StageError(f"sampling: {err}") from None
    if stochastic and sampling.greedy:
        raise StageError(f"sampling.temperature=0 (greedy): {stochastic} needs a stochastic policy")
    return sampling


def rollout_sampling(
    config: ml_collections.ConfigDict, model_cfg: ModelConfig, tokenizer: AnyTokenizer
) -> Any:
    """The rollouts' sampling settings for this policy's vocabulary and tokenizer."""
    return ro.sampling_for(sampling_settings(config), model_cfg.vocab_size, tokenizer)


def task_of(config: ml_collections.ConfigDict) -> Any:
    """The hidden oracle's task, or None when `task` is empty."""
    return load_task(config.task) if config.task else None


def check_fits(total_len: int, what: str, models: list[tuple[str, ModelConfig]]) -> None:
    """Refuse a prompt + response length (`what` names its keys) past a model's context."""
    for name, cfg in models:
        if total_len > cfg.max_seq_len:
            raise StageError(
                f"{what} = {total_len} exceeds the {name}'s max_seq_len={cfg.max_seq_len}"
            )


def check_eval_source(config: ml_collections.ConfigDict, what: str) -> None:
    if config.eval.every_steps and not (config.eval.path or config.eval.name):
        raise StageError(f"eval.every_steps > 0 needs eval.path ({what})")


def prompt_batches(
    config: ml_collections.ConfigDict,
    tokenizer: AnyTokenizer,
    mesh: jax.sharding.Mesh,
    rules: sh.Rules,
) -> Any:
    """This process's share of the `data` prompts as left-padded [B, seq_len] batches."""
    source = open_records(config, "data", "prompts")
    options = data_options(config, mesh, rules, train=True)
    local = pipelines.local_batch_size(config.batch_size, options.shard_count)
    return iter(pipelines.prompts_dataset(source, tokenizer, local, config.seq_len, options))


def updates_config(
    config: ml_collections.ConfigDict, section: str, lr: float | None = None
) -> ml_collections.ConfigDict:
    """`config` for train/sft.py `make_tx` with the schedule counted in optimizer updates
    (`<section>.epochs` x `<section>.minibatches` per iteration), learning rate `lr`
    (default optim.lr)."""
    c = ml_collections.ConfigDict(config.to_dict())
    per_iteration = config[section].epochs * config[section].minibatches
    c.total_steps *= per_iteration
    c.optim.warmup_steps *= per_iteration
    c.optim.lr = config.optim.lr if lr is None else lr
    return c


def load_reward_parent(config: ml_collections.ConfigDict, tokenizer: AnyTokenizer) -> tuple:
    """(parent, model config, calibration) of `reward_from`; refuses non-reward or
    uncalibrated checkpoints and another tokenizer. The calibration carries `pool`, the
    read its raw scores come from (train/reward.py `reward_pool`), so every reader of
    gain·raw + bias reads raw as the reward model was trained."""
    rm_parent = read_parent(config.reward_from)
    check_parent_kind(rm_parent, "reward_from", REWARD_FROM_KIND)
    check_tokenizer(rm_parent, tokenizer.fingerprint, "the policy's tokenizer")
    calibration = load_calibration(rm_parent.workdir)
    if calibration is None or calibration.get("step") != rm_parent.step:
        raise StageError(
            f"reward_from={rm_parent.workdir} has no calibration for step {rm_parent.step}; "
            "rerun `flaxlm reward` with calibration.num_samples > 0"
        )
    return (
        rm_parent,
        ModelConfig(**rm_parent.model),
        {**calibration, "pool": reward_pool(rm_parent)},
    )


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
    ending at the tokenizer's end of turn; the rollout's prompts keep only the columns the
    longest needs (`ro.trim_prompts`)."""
    prompts = ro.trim_prompts(Prompts(batch["tokens"], batch["segment_ids"], batch["positions"]))
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


def make_policy_evaluate(
    policy: Transformer,
    ref_params: Params,
    sampling: SamplingConfig,
    max_new_tokens: int,
    mesh: jax.sharding.Mesh,
    rules: sh.Rules,
    tokenizer: AnyTokenizer,
    task: Any = None,
    reward: tuple[Transformer, Params, dict] | None = None,
) -> Any:
    """(policy params, prompt batch [B, P], key) -> {kl, response_length, eos_rate
    [, rm_score][, oracle_score]}: one sampled response per prompt, no learning.

    `reward` = (reward model, its params, its calibration from `load_reward_parent`) adds
    the calibrated rm_score.
    """
    rm_model, rm_params, calibration = reward if reward is not None else (None, None, None)

    @jax.jit
    def measure(params: Params, ref: Params, rm: Params, rollout: ro.Rollout) -> dict:
        lp = pl.masked_log_probs(pl.response_logits(policy, params, rollout, sampling), rollout)
        ref_lp = pl.masked_log_probs(pl.response_logits(policy, ref, rollout, sampling), rollout)
        out = {
            "kl": jnp.mean(kl_lib.sequence_kl(kl_lib.kl_k1(lp, ref_lp), rollout.mask)),
            "response_length": jnp.mean(jnp.sum(rollout.mask, axis=-1).astype(jnp.float32)),
            "eos_rate": jnp.mean(rollout.ended.astype(jnp.float32)),
        }
        if rm is not None:
            raw = pl.reward_scores(rm_model, rm, rollout, calibration["pool"])
            out["rm_score"] = calibration["gain"] * jnp.mean(raw) + calibration["bias"]
        return out

    def evaluate(params: Params, batch: dict[str, jax.Array], key: jax.Array) -> dict:
        with sh.sharding_context(mesh, rules):
            rollout = sample_rollout(
                {"policy": policy},
                params,
                batch,
                key,
                max_new_tokens,
                sampling,
                mesh,
                rules,
                tokenizer,
            )
            metrics = measure(params, ref_params, rm_params, rollout)
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if task is not None:
            metrics["oracle_score"] = pr.oracle_score(task, tokenizer, rollout)
        return metrics

    return evaluate


def eval_prompt_batch(
    config: ml_collections.ConfigDict,
    records: Sequence[Any],
    tokenizer: AnyTokenizer,
    mesh: jax.sharding.Mesh,
    rules: sh.Rules,
) -> dict[str, jax.Array]:
    """The first `eval.batch_size` (default `batch_size`) held-out prompts that fit in
    seq_len (longer ones skipped and counted, or a stop under data.bad_records=fail; a
    ValueError when none fits), cycled to fill the batch, left-padded and sharded over
    the batch axis."""
    if len(records) == 0:
        raise StageError("eval: the held-out prompt set is empty")
    records = pipelines.fitting_records(records, tokenizer, "prompts", config.seq_len)
    size = config.eval.batch_size or config.batch_size
    rows = [
        pipelines.tokenize_prompt(records[i % len(records)], tokenizer, config.seq_len)
        for i in range(size)
    ]
    sharding = sh.batch_sharding(mesh, rules)
    return {k: jax.device_put(np.stack([r[k] for r in rows]), sharding) for k in rows[0]}


def make_eval_fn(
    config: ml_collections.ConfigDict,
    evaluate: Any,
    tokenizer: AnyTokenizer,
    mesh: jax.sharding.Mesh,
    rules: sh.Rules,
) -> Any:
    """state -> eval_* metrics of `evaluate` on the first `eval.batch_size` (default
    `batch_size`) held-out prompts (`eval.path`), cycled to fill the batch, fixed key."""
    records = open_records(config, "eval", "prompts")
    batch = eval_prompt_batch(config, records, tokenizer, mesh, rules)
    key = jax.random.key(config.seed + 1)

    def eval_fn(state: Any) -> dict[str, float]:
        return {f"eval_{k}": v for k, v in evaluate(state, batch, key).items()}

    return eval_fn


def iteration_times(t0: float, t1: float, t2: float, t3: float) -> dict[str, float]:
    """Seconds an iteration spent sampling (t0-t1), scoring (t1-t2) and learning (t2-t3),
    and the rollout's share of the whole: what faster generation would save."""
    return {
        "time_rollout": t1 - t0,
        "time_scoring": t2 - t1,
        "time_learning": t3 - t2,
        "time_rollout_share": (t1 - t0) / (t3 - t0),
    }
