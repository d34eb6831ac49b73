"""`flaxlm reward --config configs/reward.py:PRESET --workdir DIR --config.init_from=RUN`
and `flaxlm score --workdir DIR --prompt TEXT --response TEXT [--response TEXT ...]`.

The reward model is the Transformer with its scalar head (no LM head), started from an
SFT or pretraining checkpoint (`init_from`, see train/sft.py for what is taken from it);
the head is new, with std 1/sqrt(D+1) init. A batch holds B prompts with K ranked
responses each, [B, K, T] (train/data/pipelines.py `ranked_dataset`); the forward runs
on [B*K, T] and the reward is the scalar head read by `reward.pool` at the response's
`<|end|>` or averaged over its tokens (train/reward_losses.py `pool_rewards`). The loss
is the InstructGPT K-wise loss (train/reward_losses.py), all pairs of a prompt inside
one batch element.

After training, rewards are calibrated: `calibration.num_samples` responses are sampled
from the reference policy (`calibration.policy`, default `init_from`) for held-out prompts
(`calibration.prompts_path`, default the eval set's prompts), scored, and a gain and bias
are fitted so that these rewards have mean 0 and std 1. They are written, with the
checkpoint step they belong to, to `<workdir>/reward_calibration.json` and logged to
metrics.jsonl; `flaxlm score` applies them (`--raw` skips them). A rerun of a finished
workdir calibrates again only if the file is missing or belongs to another step.

Eval metrics (metrics.jsonl): eval_loss, eval_pair_accuracy (held-out pairs ordered
correctly), eval_kendall_tau (τ-b against the full ranking, mean over prompts),
eval_reward_mean / eval_reward_std, eval_margin (mean r_better - r_worse).
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from configs import loader
from model import lora
from model import sharding as sh
from model.config import ModelConfig, flops_per_token
from model.generate import SamplingConfig
from model.tokenizer import AnyTokenizer, load_tokenizer
from model.transformer import Transformer
from train import distributed
from train import reward_losses as rl
from train.data import builders, pipelines
from train.integrity import write_json
from train.metrics import MetricWriter, read_metrics
from train.optim import accumulate_gradients, apply_gradients, trainable_value_and_grad
from train.parent import Parent, check_tokenizer, load_params, read_parent
from train.sft import (
    batch_multiple,
    data_options,
    init_state_from,
    make_tx,
    open_records,
    sample_responses,
    start_from_parent,
    to_host,
)
from train.stage import (
    TOKENIZER_DIR,
    StageError,
    StageParts,
    begin_build,
    parse_stage_args,
    run_stage,
    stage_parts,
)
from train.state import (
    TrainState,
    abstract_sharded_params,
    step_rng,
)
from train.step import jit_train_step, keep_if_finite

CALIBRATION_FILE = "reward_calibration.json"
NEW_PARAMS = ("scalar_head", "scalar_bias")  # fresh when starting from an LM
Batch = dict[str, jax.Array]


def reward_model(cfg: ModelConfig) -> Transformer:
    return Transformer(cfg, lm_head=False, scalar_head=True)


def reward_pool(parent: Parent) -> str:
    """A reward checkpoint's `reward.pool`; "last" for checkpoints older than the key."""
    return ((parent.meta.get("config") or {}).get("reward") or {}).get("pool", "last")


def reward_grad_fn(model: Transformer, margin: float, center_coef: float, pool: str) -> Any:
    """(params, batch, rng) -> ((summed loss, aux sums), grads) for accumulate_gradients.

    aux: {"prompts": prompts with a pair, **ranking_stats}, all sums.
    """

    def summed_loss(params: Any, batch: Batch, rng: jax.Array) -> tuple[jax.Array, dict]:
        rewards = rl.compute_rewards(model, params, batch, pool, deterministic=False, rng=rng)
        loss_sum, prompts = rl.ranking_loss(
            rewards, batch["ranks"], batch["response_mask"], margin, center_coef
        )
        stats = rl.ranking_stats(
            jax.lax.stop_gradient(rewards), batch["ranks"], batch["response_mask"]
        )
        return loss_sum, {"prompts": prompts, **stats}

    return trainable_value_and_grad(summed_loss, has_aux=True)


def make_reward_step(
    model: Transformer,
    tx: optax.GradientTransformation,
    lr_fn: optax.Schedule,
    pool: str,
    grad_accum_steps: int = 1,
    margin: float = 0.0,
    center_coef: float = 0.0,
    skip_nonfinite: bool = False,
) -> Any:
    """The reward train step, shaped like the LM step (train/step.py): the loss is the
    mean over prompts of the whole (accumulated) batch; metrics add the ranking ones."""
    grad_fn = reward_grad_fn(model, margin, center_coef, pool)

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        loss_sum, aux, grads = accumulate_gradients(
            grad_fn, state.params, batch, step_rng(state), grad_accum_steps
        )
        scale = 1.0 / jnp.maximum(aux["prompts"], 1.0)
        grads = jax.tree.map(lambda g: g * scale, grads)
        params, opt_state = apply_gradients(tx, state.params, state.opt_state, grads)
        loss, grad_norm = loss_sum * scale, optax.tree.norm(grads)
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": lr_fn(state.step)}
        metrics |= {"num_prompts": aux["prompts"], **rl.ranking_metrics(aux)}
        if skip_nonfinite:
            params, opt_state, metrics["skipped"] = keep_if_finite(
                loss, grad_norm, (params, opt_state), (state.params, state.opt_state)
            )
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def make_eval_fn(
    model: Transformer,
    config: ml_collections.ConfigDict,
    tokenizer: AnyTokenizer,
    mesh: jax.sharding.Mesh,
    rules: sh.Rules,
) -> Any:
    """Loss and ranking metrics over the held-out ranked set (one ordered pass)."""
    source = open_records(config, "eval", "ranked")
    options = data_options(config, mesh, rules, train=False)
    dataset = pipelines.ranked_dataset(
        source,
        tokenizer,
        pipelines.local_batch_size(
            config.eval.batch_size or config.batch_size, options.shard_count
        ),
        config.seq_len,
        config.reward.max_responses,
        options,
    )
    r = config.reward

    @jax.jit
    def eval_step(params: Any, batch: Batch) -> dict[str, jax.Array]:
        rewards = rl.compute_rewards(model, params, batch, r.pool)
        loss_sum, prompts = rl.ranking_loss(
            rewards, batch["ranks"], batch["response_mask"], r.margin, r.center_coef
        )
        stats = rl.ranking_stats(rewards, batch["ranks"], batch["response_mask"])
        return {"loss_sum": loss_sum, "prompts": prompts, **stats}

    def eval_fn(state: TrainState) -> dict[str, float]:
        totals: dict[str, float] = {}
        with sh.sharding_context(mesh, rules):
            for i, batch in enumerate(distributed.in_step(dataset)):
                if config.eval.max_batches and i >= config.eval.max_batches:
                    break
                sums = eval_step(state.params, pipelines.make_global_batch(batch, mesh, rules))
                for k, v in jax.device_get(sums).items():
                    totals[k] = totals.get(k, 0.0) + float(v)
        if not totals:
            return {}
        metrics = {"eval_loss": totals["loss_sum"] / max(totals["prompts"], 1.0)}
        metrics |= {k: float(v) for k, v in rl.ranking_metrics(totals, "eval_").items()}
        return {**metrics, "eval_pairs": totals["pairs"]}

    return eval_fn


def validate(config: ml_collections.ConfigDict) -> None:
    r, c = config.reward, config.calibration
    if r.max_responses < 2:
        raise StageError(f"reward.max_responses={r.max_responses}: must be >= 2")
    if r.margin < 0 or r.center_coef < 0:
        raise StageError("reward.margin and reward.center_coef must be >= 0")
    if r.pool not in rl.POOLS:
        raise StageError(f"reward.pool={r.pool!r}: choose from {rl.POOLS}")
    if config.eval.every_steps and not (config.eval.path or config.eval.name):
        raise StageError("eval.every_steps > 0 needs eval.path (held-out ranked JSONL)")
    if c.num_samples < 0 or c.batch_size < 1 or c.max_new_tokens < 1:
        raise StageError(
            "calibration.num_samples must be >= 0, calibration.batch_size and "
            "calibration.max_new_tokens >= 1"
        )
    if c.num_samples and not (c.prompts_path or config.eval.path or config.eval.name):
        raise StageError("calibration needs prompts: set calibration.prompts_path or eval.path")
    try:
        SamplingConfig(c.temperature, c.top_k, c.top_p)
    except ValueError as err:
        raise StageError(f"calibration: {err}") from None


def build(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> StageParts:
    mesh, rules = begin_build(config, validate)
    parent, tokenizer, model_cfg = start_from_parent(config, "reward")
    source = open_records(config, "data", "ranked")
    tx, lr_fn = make_tx(config)
    options = data_options(config, mesh, rules, train=True)
    K, T = config.reward.max_responses, config.seq_len
    batches = iter(
        pipelines.ranked_dataset(
            source,
            tokenizer,
            pipelines.local_batch_size(config.batch_size, options.shard_count),
            T,
            K,
            options,
        )
    )
    model = lora.wrap(reward_model(model_cfg), lora.from_config(config))
    state, shardings = init_state_from(parent, model, tx, mesh, rules, config.seed, NEW_PARAMS)
    step = make_reward_step(
        model,
        tx,
        lr_fn,
        config.reward.pool,
        config.grad_accum_steps,
        config.reward.margin,
        config.reward.center_coef,
        skip_nonfinite=config.nonfinite == "skip",
    )
    # No LM head: drop its 6·V·D from the LM's FLOPs per token.
    lm_head_flops = 6.0 * model_cfg.vocab_size * model_cfg.d_model
    return stage_parts(
        stage="reward",
        config=config,
        model_cfg=model_cfg,
        tokenizer=tokenizer,
        lineage=parent.lineage("reward"),
        model=model,
        state=state,
        shardings=shardings,
        train_step=jit_train_step(step, shardings, mesh, rules),
        batches=batches,
        work_per_step=(config.batch_size * K * T, flops_per_token(model_cfg, T) - lm_head_flops),
        make_eval=lambda: make_eval_fn(model, config, tokenizer, mesh, rules),
        mesh=mesh,
        rules=rules,
        extra_meta={"heads": {"lm_head": False, "scalar_head": True}},
    )


# ----------------------------------------------------------------------------- scoring


def score_texts(
    model: Transformer,
    params: Any,
    tokenizer: AnyTokenizer,
    items: Sequence[tuple[Sequence[dict], str]],
    seq_len: int,
    mesh: jax.sharding.Mesh,
    rules: sh.Rules,
    pool: str,
    batch_size: int = 16,
) -> np.ndarray:
    """Raw rewards [N] (read by `pool`) of (prompt messages, response text) pairs, in batches.

    Each pair goes through the training layout (chat template) as a one-response ranked
    row, never cut (train/data/fit.py): rows are seq_len long, or as long as the longest
    pair up to the model's max_seq_len (right padding leaves the reward unchanged);
    longer raises. Batches are padded to a multiple of the batch split.
    """
    forward = jax.jit(functools.partial(rl.compute_rewards, model, pool=pool))
    multiple = batch_multiple(mesh, rules)
    records = [
        {
            "roles": [m["role"] for m in prompt],
            "contents": [m["content"] for m in prompt],
            "responses": [response],
            "ranks": [0],
        }
        for prompt, response in items
    ]
    longest = max((pipelines.record_length(r, tokenizer, "ranked") for r in records), default=0)
    seq_len = max(seq_len, min(longest, model.config.max_seq_len))
    out = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        rows = [
            pipelines.tokenize_ranked(r, tokenizer, seq_len, 1)
            for r in records[start : start + batch_size]
        ]
        rows += [rows[-1]] * (-len(rows) % multiple)
        batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
        # Every process holds the same rows: place them as one global batch.
        batch = {
            k: jax.device_put(v, sh.batch_sharding(mesh, rules, v.ndim)) for k, v in batch.items()
        }
        with sh.sharding_context(mesh, rules):
            rewards = forward(params, batch)
        out.append(to_host(rewards)[: len(chunk), 0])
    return np.concatenate(out)


def reference_prompts(config: ml_collections.ConfigDict) -> list[list[dict]]:
    """Held-out prompts for calibration: `calibration.prompts_path` or the eval set's."""
    if config.calibration.prompts_path:
        source = builders.open_source(
            "prompts", path=config.calibration.prompts_path, data_dir=config.data.data_dir or None
        )
    else:
        source = open_records(config, "eval", "ranked")
    prompts = [pipelines.conversation(source[i]) for i in range(len(source))]
    if not prompts:
        raise StageError("calibration: the prompt set is empty")
    return prompts


def log_calibration(workdir: pathlib.Path, result: dict) -> None:
    """The calibration's metrics line at its step, unless metrics.jsonl has it already:
    the calibration file is written first, so a run stopped between the two writes the
    line when it is rerun, and a rerun after both adds nothing."""
    if jax.process_index() != 0:
        return
    path = workdir / "metrics.jsonl"
    rows = read_metrics(workdir) if path.is_file() else []
    if any(r.get("step") == result["step"] and "calibration_gain" in r for r in rows):
        return
    writer = MetricWriter(workdir, resume_step=result["step"])
    writer.write(
        result["step"],
        {f"calibration_{k}": result[k] for k in ("gain", "bias", "raw_mean", "raw_std")},
    )
    writer.close()


def calibrate(config: ml_collections.ConfigDict, workdir: pathlib.Path, parts: StageParts) -> dict:
    """Fit gain/bias on reference-policy samples for the newest checkpoint; write them."""
    own = read_parent(workdir)
    path = workdir / CALIBRATION_FILE
    existing = load_calibration(workdir)
    if existing is not None and existing.get("step") == own.step:
        log_calibration(workdir, existing)  # a stop after the file, before its line
        return existing
    c, mesh, rules = config.calibration, parts.mesh, parts.rules
    model, tokenizer = parts.model, parts.tokenizer
    params = load_params(own, abstract_sharded_params(model, mesh, rules))
    policy_parent = read_parent(c.policy or config.init_from)
    check_tokenizer(policy_parent, tokenizer.fingerprint, str(workdir / TOKENIZER_DIR))
    policy = Transformer(ModelConfig(**policy_parent.model))
    policy_params = load_params(policy_parent, abstract_sharded_params(policy, mesh, rules))
    prompts = reference_prompts(config)
    prompts = [prompts[i % len(prompts)] for i in range(c.num_samples)]
    sampling = SamplingConfig(c.temperature, c.top_k, c.top_p, tokenizer.vocab_size)
    texts: list[str] = []
    for start in range(0, len(prompts), c.batch_size):
        key = jax.random.fold_in(jax.random.key(config.seed + 1), start)
        chunk = prompts[start : start + c.batch_size]
        texts += sample_responses(
            policy, policy_params, tokenizer, chunk, key, c.max_new_tokens, sampling, mesh, rules
        )
    items = list(zip(prompts, texts, strict=True))
    raw = score_texts(
        model, params, tokenizer, items, config.seq_len, mesh, rules, config.reward.pool
    )
    gain, bias = rl.fit_gain_bias(raw)
    result = {
        "step": own.step,
        "checkpoint": str(own.checkpoint),
        "gain": gain,
        "bias": bias,
        "raw_mean": float(np.mean(raw)),
        "raw_std": float(np.std(raw)),
        "num_samples": len(raw),
        "policy": str(policy_parent.checkpoint),
        "sampling": {"temperature": c.temperature, "top_k": c.top_k, "top_p": c.top_p},
        "max_new_tokens": c.max_new_tokens,
        "formula": "reward = gain * raw + bias",
    }
    if jax.process_index() == 0:
        write_json(path, result)
        log_calibration(workdir, result)
    print(
        f"calibrated on {len(raw)} reference samples: raw mean {result['raw_mean']:.4f}, "
        f"std {result['raw_std']:.4f} -> gain {gain:.4f}, bias {bias:.4f}",
        file=sys.stderr,
    )
    return result


def load_calibration(workdir: str | pathlib.Path) -> dict | None:
    """The calibration written by `flaxlm reward`, or None (RLHF stages read it too)."""
    path = pathlib.Path(workdir) / CALIBRATION_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def main(argv: Sequence[str]) -> int:
    try:
        args, config = parse_stage_args("reward", argv)
    except loader.ConfigError as err:
        print(f"flaxlm reward: error: {err}", file=sys.stderr)
        return 2
    return run(config, pathlib.Path(args.workdir))


def run(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> int:
    """Train (or resume) and calibrate: `flaxlm reward` after its arguments are parsed."""
    built: list[StageParts] = []

    def build_and_keep() -> StageParts:
        built.append(build(config, workdir))
        return built[0]

    code = run_stage("reward", workdir, config, build_and_keep)
    if code != 0 or not config.calibration.num_samples:
        return code
    try:
        calibrate(config, workdir, built[0])
    except (StageError, ValueError, FileNotFoundError) as err:
        print(f"flaxlm reward: error: calibration: {err}", file=sys.stderr)
        return 3
    return 0


def score_main(argv: Sequence[str]) -> int:
    """`flaxlm score`: print one (calibrated) reward per --response, in order."""
    parser = argparse.ArgumentParser(
        prog="flaxlm score", description="score responses with a trained reward model"
    )
    parser.add_argument("--workdir", required=True, help="a `flaxlm reward` run directory")
    parser.add_argument("--prompt", required=True, help="the user turn")
    parser.add_argument("--response", required=True, action="append", help="repeatable")
    parser.add_argument("--system", default="", help="optional system turn")
    parser.add_argument("--raw", action="store_true", help="print uncalibrated rewards")
    args = parser.parse_args(argv)
    try:
        rewards = score_workdir(
            args.workdir, args.prompt, args.response, args.system, calibrated=not args.raw
        )
    except (ValueError, FileNotFoundError) as err:
        print(f"flaxlm score: error: {err}", file=sys.stderr)
        return 2
    for value in rewards:
        print(f"{value:.6f}")
    return 0


def score_workdir(
    workdir: str | pathlib.Path,
    prompt: str,
    responses: Sequence[str],
    system: str = "",
    calibrated: bool = True,
) -> np.ndarray:
    """Rewards [len(responses)] from the newest checkpoint of a reward workdir (one device)."""
    parent: Parent = read_parent(workdir)
    if parent.stage != "reward":
        raise ValueError(f"{parent.checkpoint} is a {parent.stage} checkpoint, not a reward model")
    calibration = load_calibration(workdir) if calibrated else None
    if calibrated and (calibration is None or calibration.get("step") != parent.step):
        raise ValueError(
            f"{workdir} has no calibration for checkpoint step {parent.step}; rerun "
            "`flaxlm reward` on it (calibration.num_samples > 0) or pass --raw"
        )
    tokenizer = load_tokenizer(parent.tokenizer_dir)
    check_tokenizer(parent, tokenizer.fingerprint, str(parent.tokenizer_dir))
    model = reward_model(ModelConfig(**parent.model))
    mesh = sh.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    rules = sh.get_rules("dp")
    params = load_params(parent, abstract_sharded_params(model, mesh, rules))
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt}
    ]
    seq_len = int((parent.meta.get("config") or {}).get("seq_len") or model.config.max_seq_len)
    items = [(messages, r) for r in responses]
    raw = score_texts(model, params, tokenizer, items, seq_len, mesh, rules, reward_pool(parent))
    if calibration is None:
        return raw
    return calibration["gain"] * raw + calibration["bias"]
