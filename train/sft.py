"""`flaxlm sft --config configs/sft.py:PRESET --workdir DIR --config.init_from=RUN [...]`.

Supervised fine-tuning: conversations through the chat template, next-token loss on the
assistant tokens only, packed rows by default (`data.packing`). Thin like pretraining:
the step is the LM step (train/step.py, whose loss follows `loss_mask`), the loop and
checkpoints are the shared ones (train/stage.py, train/loop.py).

Starting point: `init_from` names a pretraining (or SFT) workdir or one checkpoint
directory. The run takes its model config (only non-shape fields such as dtype, dropout
or remat may be overridden), its tokenizer (`data.tokenizer` may name the same one
elsewhere; another one is refused) and its parameters, read straight onto this run's
mesh. The lineage records the parent checkpoint. Resuming a workdir continues from its
own checkpoint.

Eval (`eval.every_steps`): response-token loss on the held-out set (`eval.path` or
`eval.name`) and `eval.num_samples` responses sampled for held-out prompts, printed
and appended to `<workdir>/samples.jsonl`.

The helpers above `build` (parent, tokenizer, optimizer, data options, sampling) serve the
reward stage too.
"""

from __future__ import annotations

import json
import math
import pathlib
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from model import lora
from model import sharding as sh
from model.config import ModelConfig, flops_per_token
from model.generate import SamplingConfig, generate, left_pad
from model.tokenizer import AnyTokenizer, check_vocab, load_tokenizer
from model.transformer import Transformer
from train import distributed, losses
from train.data import builders, pipelines
from train.optim import optimizer_from_config
from train.parent import Parent, check_tokenizer, child_model_dict, load_params, read_parent
from train.stage import (
    INIT_FROM_KINDS,
    StageError,
    StageParts,
    begin_build,
    check_parent_kind,
    stage_main,
    stage_parts,
)
from train.state import TrainState, create_train_state
from train.step import jit_train_step, make_train_step

SAMPLES_FILE = "samples.jsonl"


# ----------------------------------------------------------------------------- shared helpers


def open_records(config: ml_collections.ConfigDict, section: str, kind: str) -> Any:
    """Records of `kind` ("sft", "ranked", "prompts") from `<section>.path` or `.name`.

    A local file or glob is one split of its own (the held-out file is the eval set), so
    `<section>.split` applies to named datasets only.
    """
    d = config[section]
    if not d.path and not d.name:
        raise StageError(f"{section}.path and {section}.name are both empty: say where the data is")
    return builders.open_source(
        kind,
        path=d.path or None,
        name=d.name or None,
        split="train" if d.path else d.split,
        data_dir=config.data.data_dir or None,
        bad_records=config.data.bad_records,
    )


# The one optimizer factory, under the name the stages use.
make_tx = optimizer_from_config


def parent_tokenizer(config: ml_collections.ConfigDict, parent: Parent) -> AnyTokenizer:
    """`data.tokenizer` if set, else the parent's; it must be the parent's tokenizer."""
    source = config.data.tokenizer or parent.tokenizer_dir
    if not source:
        raise StageError(f"init_from={parent.checkpoint} records no tokenizer: set data.tokenizer")
    try:
        tokenizer = load_tokenizer(source)
    except FileNotFoundError as err:
        raise StageError(f"tokenizer of init_from={parent.checkpoint}: {err}") from None
    check_tokenizer(parent, tokenizer.fingerprint, str(source))
    return tokenizer


def start_from_parent(
    config: ml_collections.ConfigDict, stage: str
) -> tuple[Parent, AnyTokenizer, ModelConfig]:
    """Read `init_from` (meta only): the parent, its tokenizer and the child's model config.

    A parent of a kind `stage` cannot start from (INIT_FROM_KINDS) is refused.
    `config.model` is rewritten to the resolved fields so config.json is self-contained.
    """
    if not config.init_from:
        raise StageError(
            f"init_from is empty: {stage} starts from a checkpoint "
            "(--config.init_from=WORKDIR_OR_CHECKPOINT)"
        )
    parent = read_parent(config.init_from)
    check_parent_kind(parent, "init_from", INIT_FROM_KINDS[stage])
    overrides = {k: v for k, v in config.model.to_dict().items() if k not in ("preset", "lora")}
    model_dict = child_model_dict(parent, overrides)
    for key, value in model_dict.items():
        config.model[key] = value
    try:
        model_cfg = ModelConfig(**model_dict)
    except (TypeError, ValueError) as err:
        raise StageError(str(err)) from None
    tokenizer = parent_tokenizer(config, parent)
    check_vocab(model_cfg.vocab_size, tokenizer, allow_padding=True)
    try:  # every stage that starts from a parent trains on chats or samples them
        tokenizer.encode_chat([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    except ValueError as err:  # e.g. a checkpoint's tokenizer without a chat template
        raise StageError(f"{stage}: {err}") from None
    if config.seq_len > model_cfg.max_seq_len:
        raise StageError(
            f"seq_len={config.seq_len} exceeds model.max_seq_len={model_cfg.max_seq_len}"
        )
    return parent, tokenizer, model_cfg


def init_state_from(
    parent: Parent,
    model: Transformer,
    tx: Any,
    mesh: jax.sharding.Mesh,
    rules: sh.Rules,
    seed: int,
    new: tuple[str, ...] = (),
) -> tuple[TrainState, TrainState]:
    """A fresh sharded state whose parameters are the parent's (`new` ones stay fresh).

    The optimizer state of a fresh init does not depend on parameter values (zeros and a
    count), so only the parameters are swapped in.
    """
    state, shardings = create_train_state(model, tx, mesh, rules, seed)
    params = load_params(parent, state.params, init=state.params, new=new)
    return state.replace(params=params), shardings


def data_options(
    config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, rules: sh.Rules, train: bool
) -> pipelines.DataOptions:
    """Training order (seeded shuffle, repeat) or one ordered pass for eval."""
    shard_index, shard_count = pipelines.process_shard(mesh, rules)
    if train:
        return pipelines.DataOptions(
            seed=config.seed,
            shard_index=shard_index,
            shard_count=shard_count,
            num_workers=config.data.num_workers,
        )
    return pipelines.DataOptions(
        seed=0, shuffle=False, num_epochs=1, shard_index=shard_index, shard_count=shard_count
    )


def batch_multiple(mesh: jax.sharding.Mesh, rules: sh.Rules) -> int:
    """How many ways the batch axis is split: global batches must be a multiple."""
    spec = sh.batch_sharding(mesh, rules).spec[0]
    axes = () if spec is None else (spec,) if isinstance(spec, str) else spec
    return math.prod(mesh.shape[a] for a in axes)


def to_host(x: jax.Array) -> np.ndarray:
    """A global array as numpy on every process (gathered when it spans several hosts)."""
    if x.is_fully_addressable:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def split_prompt(messages: Sequence[dict]) -> tuple[list[dict], str | None]:
    """A conversation -> (the turns before its last assistant turn, that turn's text)."""
    for i in range(len(messages) - 1, -1, -1):
        if messages[i]["role"] == "assistant":
            return list(messages[:i]), messages[i]["content"]
    return list(messages), None


def sample_responses(
    model: Transformer,
    params: Any,
    tokenizer: AnyTokenizer,
    prompts: Sequence[Sequence[dict]],
    key: jax.Array,
    max_new_tokens: int,
    sampling: SamplingConfig,
    mesh: jax.sharding.Mesh,
    rules: sh.Rules,
) -> list[str]:
    """Sample one assistant reply per prompt (a list of messages) -> decoded texts.

    A prompt longer than max_seq_len - max_new_tokens loses whole oldest exchanges, never
    its system turn nor its last user turn (ValueError when those alone do not fit;
    train/data/fit.py); the batch is padded with copies to a multiple of the batch split.
    Generation stops at `<|end|>` or eos, which are not part of the returned text. Ids of
    the padded vocabulary rows (>= the tokenizer's size; `generate` does not mask them)
    decode to nothing.
    """
    limit = model.config.max_seq_len - max_new_tokens
    what = f"max_seq_len - max_new_tokens ({model.config.max_seq_len} - {max_new_tokens})"
    rows = [pipelines.generation_prompt(tokenizer, m, limit, what).tolist() for m in prompts]
    multiple = batch_multiple(mesh, rules)
    padded = rows + [rows[-1]] * (-len(rows) % multiple)
    batch = left_pad(padded, tokenizer.pad_id)
    out = generate(
        model,
        params,
        batch.tokens,
        batch.segment_ids,
        key,
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        eos_id=tokenizer.end_of_turn_id,
        pad_id=tokenizer.pad_id,
        mesh=mesh,
        rules=rules,
    )
    tokens, mask = to_host(out.tokens), to_host(out.mask)
    texts = []
    for row in range(len(rows)):
        ids = [int(t) for t, m in zip(tokens[row], mask[row], strict=True) if m]
        keep = [t for t in ids if t not in tokenizer.stop_ids and t < tokenizer.vocab_size]
        texts.append(tokenizer.decode(keep))
    return texts


def append_jsonl(path: pathlib.Path, rows: Sequence[dict]) -> None:
    if jax.process_index() == 0:
        with path.open("a") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")


# ----------------------------------------------------------------------------- SFT


def validate(config: ml_collections.ConfigDict) -> None:
    e = config.eval
    if e.num_samples < 0:
        raise StageError(f"eval.num_samples={e.num_samples}: must be >= 0")
    if e.num_samples and e.sample_tokens < 1:
        raise StageError(f"eval.sample_tokens={e.sample_tokens}: must be >= 1")
    if config.eval.every_steps and not (e.path or e.name):
        raise StageError("eval.every_steps > 0 needs eval.path (held-out SFT JSONL) or eval.name")
    try:
        SamplingConfig(e.temperature, e.top_k, e.top_p)
    except ValueError as err:
        raise StageError(f"eval: {err}") from None


def make_eval_fn(
    model: Transformer,
    config: ml_collections.ConfigDict,
    tokenizer: AnyTokenizer,
    mesh: jax.sharding.Mesh,
    rules: sh.Rules,
    workdir: pathlib.Path,
) -> Any:
    """Response-token loss over the held-out conversations, then sampled replies."""
    source = open_records(config, "eval", "sft")
    batch_size = config.eval.batch_size or config.batch_size
    options = data_options(config, mesh, rules, train=False)
    dataset = pipelines.sft_dataset(
        source,
        tokenizer,
        pipelines.local_batch_size(batch_size, options.shard_count),
        config.seq_len,
        options,
        config.data.packing,
    )
    prompts, references = [], []
    for i in range(len(source)):
        if len(prompts) == config.eval.num_samples:
            break
        prompt, reference = split_prompt(pipelines.conversation(source[i]))
        if prompt:
            prompts.append(prompt)
            references.append(reference)
    sampling = SamplingConfig(
        config.eval.temperature, config.eval.top_k, config.eval.top_p, tokenizer.vocab_size
    )

    @jax.jit
    def eval_step(params: Any, batch: dict) -> tuple[jax.Array, jax.Array]:
        out = model.apply(
            {"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"]
        )
        mean, count = losses.cross_entropy(out.logits, batch["targets"], batch["loss_mask"])
        return mean * count, count

    def eval_fn(state: TrainState) -> dict[str, float]:
        total, count = 0.0, 0.0
        with sh.sharding_context(mesh, rules):
            for i, batch in enumerate(distributed.in_step(dataset)):
                if config.eval.max_batches and i >= config.eval.max_batches:
                    break
                loss_sum, n = eval_step(
                    state.params, pipelines.make_global_batch(batch, mesh, rules)
                )
                total, count = total + float(loss_sum), count + float(n)
        metrics = {"eval_loss": total / max(count, 1.0), "eval_tokens": count}
        if prompts:
            step = int(state.step)
            key = jax.random.fold_in(jax.random.key(config.seed), step)
            texts = sample_responses(
                model,
                state.params,
                tokenizer,
                prompts,
                key,
                config.eval.sample_tokens,
                sampling,
                mesh,
                rules,
            )
            rows = [
                {"step": step, "prompt": p[-1]["content"], "response": t, "reference": r}
                for p, t, r in zip(prompts, texts, references, strict=True)
            ]
            for row in rows:
                tqdm.write(f"[sample step {step}] {row['prompt']!r} -> {row['response']!r}")
            append_jsonl(workdir / SAMPLES_FILE, rows)
        return metrics

    return eval_fn


def build(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> StageParts:
    mesh, rules = begin_build(config, validate)
    parent, tokenizer, model_cfg = start_from_parent(config, "sft")
    source = open_records(config, "data", "sft")
    tx, lr_fn = make_tx(config)
    options = data_options(config, mesh, rules, train=True)
    batches = iter(
        pipelines.sft_dataset(
            source,
            tokenizer,
            pipelines.local_batch_size(config.batch_size, options.shard_count),
            config.seq_len,
            options,
            config.data.packing,
        )
    )
    model = lora.wrap(Transformer(model_cfg), lora.from_config(config))
    state, shardings = init_state_from(parent, model, tx, mesh, rules, config.seed)
    step = make_train_step(
        model,
        tx,
        lr_fn,
        config.grad_accum_steps,
        config.z_loss,
        skip_nonfinite=config.nonfinite == "skip",
    )
    return stage_parts(
        stage="sft",
        config=config,
        model_cfg=model_cfg,
        tokenizer=tokenizer,
        lineage=parent.lineage("sft"),
        model=model,
        state=state,
        shardings=shardings,
        train_step=jit_train_step(step, shardings, mesh, rules),
        batches=batches,
        work_per_step=(
            config.batch_size * config.seq_len,
            flops_per_token(model_cfg, config.seq_len),
        ),
        make_eval=lambda: make_eval_fn(model, config, tokenizer, mesh, rules, workdir),
        mesh=mesh,
        rules=rules,
    )


def main(argv: Sequence[str]) -> int:
    return stage_main("sft", build, argv)
