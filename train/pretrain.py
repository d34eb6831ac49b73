"""`flaxlm pretrain --config configs/pretrain.py:PRESET --workdir DIR [--config.KEY=VALUE]`.

Thin: resolve the config, build tokenizer/data/model/step, hand them to the shared loop
(train/stage.py, train/loop.py). Rerunning the same command resumes from the newest
checkpoint with the exact data position and RNG.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from configs import loader
from model import generate, lora
from model import sharding as sh
from model.config import flops_per_token
from model.tokenizer import (
    AnyTokenizer,
    check_vocab,
    load_tokenizer,
    train_tokenizer,
    training_sentences,
)
from model.transformer import Transformer
from train import distributed, losses
from train.data import builders, pipelines
from train.optim import optimizer_from_config
from train.parent import lineage
from train.stage import (
    TOKENIZER_DIR,
    StageError,
    StageParts,
    begin_build,
    stage_main,
    stage_parts,
)
from train.state import create_train_state
from train.step import jit_train_step, make_train_step

VOCAB_MULTIPLE = 128


def open_text(config: ml_collections.ConfigDict, section: str) -> Any:
    """Records of a text dataset: `<section>.path` (local files) wins over `<section>.name`."""
    d = config[section]
    data = config.data
    if not d.path and not d.name:
        raise StageError(f"{section}.path and {section}.name are both empty: say where the text is")
    return builders.open_source(
        "text",
        path=d.path or None,
        name=d.name or None,
        split=d.split,
        data_dir=data.data_dir or None,
        local_copy=data.local_copy or None,
        doc_mode=data.doc_mode,
        text_key=data.text_key,
        bad_records=data.bad_records,
    )


def texts(source: Any, text_key: str) -> Any:
    for i in range(len(source)):
        value = source[i][text_key]
        yield value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def get_tokenizer(
    config: ml_collections.ConfigDict, workdir: pathlib.Path, source: Any
) -> AnyTokenizer:
    """data.tokenizer if given, else the workdir's (resume), else train one on the data."""
    if config.data.tokenizer:
        return load_tokenizer(config.data.tokenizer)
    if (workdir / TOKENIZER_DIR).is_dir():
        return load_tokenizer(workdir / TOKENIZER_DIR)
    sentences = training_sentences(texts(source, config.data.text_key))
    return train_tokenizer(sentences, config.data.vocab_size, config.data.tokenizer_type)


def make_eval_fn(
    model: Transformer,
    config: ml_collections.ConfigDict,
    tokenizer: AnyTokenizer,
    mesh: jax.sharding.Mesh,
    rules: sh.Rules,
) -> Any:
    """Mean next-token loss over the whole eval split, cut into windows of seq_len."""
    source = open_text(config, "eval")
    batch_size = config.eval.batch_size or config.batch_size
    shard_index, shard_count = pipelines.process_shard(mesh, rules)
    options = pipelines.DataOptions(
        seed=0, shuffle=False, num_epochs=1, shard_index=shard_index, shard_count=shard_count
    )
    dataset = pipelines.pretrain_dataset(
        source,
        tokenizer,
        pipelines.local_batch_size(batch_size, shard_count),
        config.seq_len,
        options,
        packing="concat_split",
        text_key=config.data.text_key,
    )

    @jax.jit
    def eval_step(params: Any, batch: dict) -> tuple[jax.Array, jax.Array]:
        out = model.apply(
            {"params": params}, batch["inputs"], batch.get("positions"), batch.get("segment_ids")
        )
        mean, count = losses.cross_entropy(out.logits, batch["targets"], batch["loss_mask"])
        return mean * count, count

    def eval_fn(state: Any) -> dict[str, float]:
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
        if config.eval.sample_prompt:
            metrics["sample"] = sample_text(model, state.params, tokenizer, config, mesh, rules)
        return metrics

    return eval_fn


def sample_text(
    model: Transformer,
    params: Any,
    tokenizer: AnyTokenizer,
    config: ml_collections.ConfigDict,
    mesh: jax.sharding.Mesh,
    rules: sh.Rules,
) -> str:
    """A short continuation of eval.sample_prompt (temperature 0.8, top-k 40, fixed key)."""
    prompt = generate.left_pad([tokenizer.encode_document(config.eval.sample_prompt)[:-1]])
    copies = max(1, mesh.shape["data"] * mesh.shape["fsdp"])  # one row per batch shard
    tokens = np.repeat(prompt.tokens, copies, axis=0)
    segments = np.repeat(prompt.segment_ids, copies, axis=0)
    out = generate.generate(
        model,
        params,
        tokens,
        segments,
        jax.random.key(config.seed),
        max_new_tokens=config.eval.sample_tokens,
        sampling=generate.SamplingConfig(
            temperature=0.8, top_k=40, vocab_limit=tokenizer.vocab_size
        ),
        eos_id=tokenizer.eos_id,
        mesh=mesh,
        rules=rules,
    )
    ids = [
        int(t)
        for t, m in zip(out.tokens[0], out.mask[0], strict=True)
        if m and int(t) < tokenizer.vocab_size
    ]  # padded vocabulary rows never decode
    return config.eval.sample_prompt + tokenizer.decode(ids)


def build(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> StageParts:
    mesh, rules = begin_build(config)  # its checks need the tokenizer: below
    source = open_text(config, "data")
    tokenizer = get_tokenizer(config, workdir, source)
    if config.model.vocab_size is None:
        # Follow the tokenizer, padded to a multiple of 128 so the vocab axis splits over
        # any tensor-parallel degree; the padded ids never occur in data.
        config.model.vocab_size = -(-tokenizer.vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    model_cfg = loader.model_config(config)
    check_vocab(model_cfg.vocab_size, tokenizer, allow_padding=True)
    if config.seq_len > model_cfg.max_seq_len:
        raise StageError(
            f"seq_len={config.seq_len} exceeds model.max_seq_len={model_cfg.max_seq_len}"
        )
    tx, lr_fn = optimizer_from_config(config)
    shard_index, shard_count = pipelines.process_shard(mesh, rules)
    local_batch = pipelines.local_batch_size(config.batch_size, shard_count)
    options = pipelines.DataOptions(
        seed=config.seed,
        shard_index=shard_index,
        shard_count=shard_count,
        num_workers=config.data.num_workers,
    )
    batches = iter(
        pipelines.pretrain_dataset(
            source,
            tokenizer,
            local_batch,
            config.seq_len,
            options,
            config.data.packing,
            text_key=config.data.text_key,
        )
    )
    model = lora.wrap(Transformer(model_cfg), lora.from_config(config))
    state, shardings = create_train_state(model, tx, mesh, rules, config.seed)
    step = make_train_step(
        model,
        tx,
        lr_fn,
        config.grad_accum_steps,
        config.z_loss,
        skip_nonfinite=config.nonfinite == "skip",
    )
    return stage_parts(
        stage="pretrain",
        config=config,
        model_cfg=model_cfg,
        tokenizer=tokenizer,
        lineage=lineage("pretrain", config.init_from or None),
        model=model,
        state=state,
        shardings=shardings,
        train_step=jit_train_step(step, shardings, mesh, rules),
        batches=batches,
        work_per_step=(
            config.batch_size * config.seq_len,
            flops_per_token(model_cfg, config.seq_len),
        ),
        make_eval=lambda: make_eval_fn(model, config, tokenizer, mesh, rules),
        mesh=mesh,
        rules=rules,
    )


def main(argv: Sequence[str]) -> int:
    return stage_main("pretrain", build, argv)
