"""`flaxlm dpo --config configs/dpo.py:PRESET --workdir DIR --config.init_from=SFT_RUN
--config.data.path=ranked.jsonl`.

Direct Preference Optimization (Rafailov et al., 2023; math in rlhf/dpo_math.py):
- policy π and frozen reference π_ref both start from the SFT checkpoint (`init_from`);
- the ranked K-wise data (train/data/records.py) is expanded to preference pairs, every
  pair of a prompt's responses with different ranks (ties give none), each pair one
  example (`batch_size` counts pairs); a pair is the ranked batch format with K = 2,
  [2, T] per array: row 0 the chosen response, row 1 the rejected one;
- sequence log-probs are sums over the response tokens and its `<|end|>` (the ranked
  format's completion_mask), at temperature 1 over the tokenizer's vocabulary.

Decision: the reference log-probs are computed once per launch, at build time, by one
ordered pass of the frozen reference over every pair (train and held-out), and kept with
the examples: each pair carries its `ref_logps` [2] through the grain pipeline, so a
step runs one forward/backward of the policy only. A resumed launch recomputes them:
the same program on the same inputs gives bitwise the same values, so the run stays
exactly resumable; the cost is one forward pass over the data per launch, no file to
keep consistent with the data. Without `task`, the reference pass reads the policy's
initial parameters (the same checkpoint), so π_ref takes no memory during training.

Metrics per step (metrics.jsonl): loss, reward_accuracy, reward_margin, chosen_reward,
rejected_reward, logps_chosen, logps_rejected (rlhf/dpo_math.py `dpo_loss`), grad_norm,
lr; eval over the held-out ranked file (`eval.path`): the eval_ versions and eval_pairs;
with `task` also eval_oracle_score, eval_kl, eval_response_length, eval_eos_rate of one
response sampled per held-out prompt (rlhf/policy_stage.py `make_policy_evaluate`).
"""

from __future__ import annotations

import functools
import pathlib
import sys
import time
from collections.abc import Sequence
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from model import lora
from model import sharding as sh
from model.config import flops_per_token
from model.generate import limit_vocab, token_log_probs
from model.tokenizer import AnyTokenizer
from model.transformer import Transformer
from rlhf import policy_stage as ps
from rlhf.dpo_math import dpo_loss, preference_pairs, sequence_log_probs
from train import distributed
from train.data import pipelines
from train.optim import accumulate_gradients, apply_gradients, trainable_value_and_grad
from train.parent import load_params
from train.sft import (
    batch_multiple,
    data_options,
    init_state_from,
    make_tx,
    open_records,
    start_from_parent,
    to_host,
)
from train.stage import StageError, StageParts, begin_build, stage_main, stage_parts
from train.state import TrainState, abstract_sharded_params, step_rng
from train.step import jit_train_step, keep_if_finite

Params = Any
Batch = dict[str, jax.Array]
PAIR_KEYS = ("tokens", "segment_ids", "positions", "completion_mask")


# ----------------------------------------------------------------------------- pair data


def pair_index(records: Sequence[Any], max_responses: int = 0) -> np.ndarray:
    """[M, 3] int64 rows (record, chosen response, rejected response) over all records;
    `max_responses` > 0 keeps each record's first K responses (as the reward stage)."""
    rows = []
    for i in range(len(records)):
        ranks = [int(r) for r in records[i]["ranks"]]
        ranks = ranks[:max_responses] if max_responses else ranks
        rows += [(i, chosen, rejected) for chosen, rejected in preference_pairs(ranks)]
    return np.asarray(rows, np.int64).reshape(-1, 3)


class PairSource:
    """Random-access pairs for grain: pair m -> the ranked arrays with K = 2 ([2, T]:
    chosen, rejected; PAIR_KEYS) plus `ref_logps` [2] once they are set."""

    def __init__(self, records: Sequence[Any], pairs: np.ndarray, tokenizer: AnyTokenizer, T: int):
        self.records, self.pairs, self.tokenizer, self.seq_len = records, pairs, tokenizer, T
        self.ref_logps: np.ndarray | None = None  # [M, 2] float32

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, m: int) -> dict[str, np.ndarray]:
        i, chosen, rejected = (int(x) for x in self.pairs[m])
        record = self.records[i]
        pair = {
            "roles": record["roles"],
            "contents": record["contents"],
            "responses": [record["responses"][chosen], record["responses"][rejected]],
            "ranks": [0, 1],
        }
        row = pipelines.tokenize_ranked(pair, self.tokenizer, self.seq_len, 2)
        out = {k: row[k] for k in PAIR_KEYS}
        if self.ref_logps is not None:
            out["ref_logps"] = self.ref_logps[m]
        return out


def pairs_dataset(
    source: PairSource, batch_size: int, options: pipelines.DataOptions
) -> grain.IterDataset:
    """Batches [B, 2, T] (+ ref_logps [B, 2]) with the stages' order, sharding and stamp.

    Uses train/data/pipelines.py's record and batch steps (private there: the pair source
    is this stage's own; exposing them would be the cleaner seam).
    """
    stamp = {"stage": "dpo_pairs", "seq_len": source.seq_len, "pairs": len(source)}
    stamp |= {"tokenizer": source.tokenizer.fingerprint, "records": len(source.records)}
    return pipelines._batches(pipelines._records(source, options), options, batch_size, stamp)


# ----------------------------------------------------------------------------- log-probs


def pair_log_probs(model: Transformer, params: Params, batch: Batch, vocab_limit: int) -> jax.Array:
    """Sequence log-probs [B, 2] of a pair batch ([B, 2, T] arrays): the sum over
    completion_mask tokens of log_softmax(limit_vocab(logits)) at the next token."""
    B, K, T = batch["tokens"].shape
    flat = {k: batch[k].reshape(B * K, T) for k in PAIR_KEYS}
    logits = model.apply(
        {"params": params}, flat["tokens"], flat["positions"], flat["segment_ids"]
    ).logits
    logits = limit_vocab(logits[:, :-1].astype(jnp.float32), vocab_limit)  # predict 1..T-1
    lp = token_log_probs(jax.nn.log_softmax(logits, axis=-1), flat["tokens"][:, 1:])
    return sequence_log_probs(lp, flat["completion_mask"][:, 1:]).reshape(B, K)


def reference_log_probs(
    forward: Any,
    params: Params,
    source: PairSource,
    batch_size: int,
    mesh: jax.sharding.Mesh,
    rules: sh.Rules,
) -> np.ndarray:
    """[M, 2] float32 log-probs `forward(params, batch)` (jitted `pair_log_probs`) of every
    pair, in order, `batch_size` at a time (the last batch padded with copies). Every
    process passes the same rows."""
    out = []
    for start in range(0, len(source), batch_size):
        rows = [source[m] for m in range(start, min(start + batch_size, len(source)))]
        n = len(rows)
        rows += [rows[-1]] * (batch_size - n)
        batch = {k: np.stack([r[k] for r in rows]) for k in PAIR_KEYS}
        batch = {
            k: jax.device_put(v, sh.batch_sharding(mesh, rules, v.ndim)) for k, v in batch.items()
        }
        with sh.sharding_context(mesh, rules):
            out.append(to_host(forward(params, batch))[:n])
    return np.concatenate(out).astype(np.float32)


# ----------------------------------------------------------------------------- the step


def make_dpo_step(
    model: Transformer,
    tx: optax.GradientTransformation,
    lr_fn: optax.Schedule,
    d: ml_collections.ConfigDict,
    vocab_limit: int,
    grad_accum_steps: int = 1,
    skip_nonfinite: bool = False,
) -> Any:
    """`train_step(state, pair batch) -> (state, metrics)`; the loss is the mean over the
    pairs of the whole (accumulated) batch. Deterministic forward (no dropout), so the
    policy at step 0 scores exactly what the reference pass scored."""

    def summed(params: Params, batch: Batch, rng: jax.Array) -> tuple[jax.Array, dict]:
        del rng
        logps, ref = pair_log_probs(model, params, batch, vocab_limit), batch["ref_logps"]
        loss, metrics = dpo_loss(
            logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1], d.beta, d.label_smoothing
        )
        n = jnp.float32(logps.shape[0])
        return loss * n, {"pairs": n, **{k: v * n for k, v in metrics.items()}}

    grad_fn = trainable_value_and_grad(summed, has_aux=True)

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        loss_sum, aux, grads = accumulate_gradients(
            grad_fn, state.params, batch, step_rng(state), grad_accum_steps
        )
        scale = 1.0 / aux.pop("pairs")
        grads = jax.tree.map(lambda g: g * scale, grads)
        params, opt_state = apply_gradients(tx, state.params, state.opt_state, grads)
        loss, grad_norm = loss_sum * scale, optax.tree.norm(grads)
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": lr_fn(state.step)}
        metrics |= {k: v * scale for k, v in aux.items()}
        if skip_nonfinite:
            params, opt_state, metrics["skipped"] = keep_if_finite(
                loss, grad_norm, (params, opt_state), (state.params, state.opt_state)
            )
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def make_eval_fn(
    model: Transformer,
    config: ml_collections.ConfigDict,
    pairs: PairSource,
    vocab_limit: int,
    mesh: jax.sharding.Mesh,
    rules: sh.Rules,
    sample_eval: Any = None,
) -> Any:
    """state -> eval_* DPO metrics over the held-out pairs (one ordered pass; padding
    rows of the last batch are left out), plus `sample_eval(state)` when given."""
    d = config.dpo
    options = data_options(config, mesh, rules, train=False)
    size = config.eval.batch_size or config.batch_size
    dataset = pairs_dataset(pairs, pipelines.local_batch_size(size, options.shard_count), options)

    def per_pair(pc: jax.Array, pr: jax.Array, rc: jax.Array, rr: jax.Array) -> dict:
        loss, metrics = dpo_loss(pc[None], pr[None], rc[None], rr[None], d.beta, d.label_smoothing)
        return {"loss": loss, **metrics}

    @jax.jit
    def eval_step(params: Params, batch: Batch) -> dict[str, jax.Array]:
        logps, ref = pair_log_probs(model, params, batch, vocab_limit), batch["ref_logps"]
        stats = jax.vmap(per_pair)(logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1])
        valid = jnp.sum(batch["completion_mask"][:, 0], axis=-1) > 0  # not a padding row
        sums = {k: jnp.sum(jnp.where(valid, v, 0.0)) for k, v in stats.items()}
        return {**sums, "pairs": jnp.sum(valid.astype(jnp.float32))}

    def eval_fn(state: TrainState) -> dict[str, float]:
        totals: dict[str, float] = {}
        with sh.sharding_context(mesh, rules):
            for i, batch in enumerate(distributed.in_step(dataset)):
                if config.eval.max_batches and i >= config.eval.max_batches:
                    break
                sums = eval_step(state.params, pipelines.make_global_batch(batch, mesh, rules))
                for k, v in jax.device_get(sums).items():
                    totals[k] = totals.get(k, 0.0) + float(v)
        count = max(totals.pop("pairs", 0.0), 1.0)
        metrics = {f"eval_{k}": v / count for k, v in totals.items()}
        metrics["eval_pairs"] = count
        if sample_eval is not None:
            metrics |= sample_eval(state)
        return metrics

    return eval_fn


def make_sample_eval(
    config: ml_collections.ConfigDict,
    evaluate: Any,
    records: Sequence[Any],
    tokenizer: AnyTokenizer,
    mesh: jax.sharding.Mesh,
    rules: sh.Rules,
) -> Any:
    """state -> eval_{oracle_score, kl, response_length, eos_rate}: one response sampled
    per held-out prompt (the first eval.batch_size, default batch_size, cycled), fixed key."""
    batch = ps.eval_prompt_batch(config, records, tokenizer, mesh, rules)
    key = jax.random.key(config.seed + 1)
    return lambda state: {f"eval_{k}": v for k, v in evaluate(state.params, batch, key).items()}


# ----------------------------------------------------------------------------- the stage


def validate(config: ml_collections.ConfigDict) -> None:
    d = config.dpo
    if not d.beta > 0:
        raise StageError(f"dpo.beta={d.beta}: must be > 0")
    if not 0.0 <= d.label_smoothing < 0.5:
        raise StageError(f"dpo.label_smoothing={d.label_smoothing}: must be in [0, 0.5)")
    if d.max_responses == 1 or d.max_responses < 0:
        raise StageError(f"dpo.max_responses={d.max_responses}: 0 (all) or >= 2")
    if d.ref_batch_size < 0 or d.max_new_tokens < 1:
        raise StageError("dpo.ref_batch_size must be >= 0 and dpo.max_new_tokens >= 1")
    ps.check_eval_source(config, "held-out ranked JSONL")
    ps.sampling_settings(config)


def build(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> StageParts:
    del workdir
    mesh, rules = begin_build(config, validate)
    parent, tokenizer, model_cfg = start_from_parent(config, "dpo")  # refuses non-policies
    d, T = config.dpo, config.seq_len
    task = ps.task_of(config)
    sampling = ps.rollout_sampling(config, model_cfg, tokenizer)
    if task is not None:
        ps.check_fits(
            config.seq_len + d.max_new_tokens,
            "seq_len + dpo.max_new_tokens",
            [("policy", model_cfg)],
        )
    splits = {"train": "data", "eval": "eval"} if config.eval.every_steps else {"train": "data"}
    sources = {
        split: pipelines.fitting_records(
            open_records(config, section, "ranked"), tokenizer, "ranked", T, d.max_responses
        )
        for split, section in splits.items()
    }
    model = lora.wrap(Transformer(model_cfg), lora.from_config(config))
    tx, lr_fn = make_tx(config)
    state, shardings = init_state_from(parent, model, tx, mesh, rules, config.seed)
    # The reference is the init_from checkpoint, which the fresh state also holds: read
    # it again only when eval samples need π_ref after the state has moved.
    ref_params = state.params
    if task is not None and config.eval.every_steps:
        ref_params = load_params(parent, abstract_sharded_params(model, mesh, rules))
    pairs = reference_pairs(config, sources, model, ref_params, tokenizer, sampling, mesh, rules)
    options = data_options(config, mesh, rules, train=True)
    local = pipelines.local_batch_size(config.batch_size, options.shard_count)

    def make_eval() -> Any:
        sample_eval = None
        if task is not None:
            evaluate = ps.make_policy_evaluate(
                model, ref_params, sampling, d.max_new_tokens, mesh, rules, tokenizer, task
            )
            sample_eval = make_sample_eval(
                config, evaluate, sources["eval"], tokenizer, mesh, rules
            )
        return make_eval_fn(
            model, config, pairs["eval"], sampling.vocab_limit, mesh, rules, sample_eval
        )

    step = make_dpo_step(
        model,
        tx,
        lr_fn,
        d,
        sampling.vocab_limit,
        config.grad_accum_steps,
        skip_nonfinite=config.nonfinite == "skip",
    )
    return stage_parts(
        stage="dpo",
        config=config,
        model_cfg=model_cfg,
        tokenizer=tokenizer,
        lineage=parent.lineage("dpo"),
        model=model,
        state=state,
        shardings=shardings,
        train_step=jit_train_step(step, shardings, mesh, rules),
        batches=iter(pairs_dataset(pairs["train"], local, options)),
        work_per_step=(config.batch_size * 2 * T, flops_per_token(model_cfg, T)),
        make_eval=make_eval,
        mesh=mesh,
        rules=rules,
        extras={"pairs": pairs, "vocab_limit": sampling.vocab_limit},
    )


def reference_pairs(
    config: ml_collections.ConfigDict,
    sources: dict[str, Any],
    model: Transformer,
    ref_params: Params,
    tokenizer: AnyTokenizer,
    sampling: Any,
    mesh: jax.sharding.Mesh,
    rules: sh.Rules,
) -> dict[str, PairSource]:
    """Each split's preference pairs with the frozen reference's log-probs, computed once."""
    d = config.dpo
    ref_batch = d.ref_batch_size or config.batch_size
    if ref_batch % batch_multiple(mesh, rules):
        raise StageError(
            f"dpo.ref_batch_size={ref_batch}: must be a multiple of the "
            f"{batch_multiple(mesh, rules)} ways the batch is split over devices"
        )
    pairs = {}
    for split, records in sources.items():
        index = pair_index(records, d.max_responses)
        if len(index) == 0:
            raise StageError(f"{split} data: no preference pairs (every ranking is a tie)")
        pairs[split] = PairSource(records, index, tokenizer, config.seq_len)
    start = time.perf_counter()
    forward = jax.jit(functools.partial(pair_log_probs, model, vocab_limit=sampling.vocab_limit))
    for source in pairs.values():
        source.ref_logps = reference_log_probs(forward, ref_params, source, ref_batch, mesh, rules)
    print(
        f"dpo: reference log-probs of {sum(len(p) for p in pairs.values())} pairs "
        f"in {time.perf_counter() - start:.1f} s",
        file=sys.stderr,
    )
    return pairs


def main(argv: Sequence[str]) -> int:
    return stage_main("dpo", build, argv)
