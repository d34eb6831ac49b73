"""Pretraining (next-token prediction) configs.

    flaxlm pretrain --config configs/pretrain.py:tiny --workdir /tmp/pretrain_tiny
    flaxlm pretrain --config configs/pretrain.py:shakespeare_char --workdir /tmp/shakespeare
    flaxlm pretrain --config configs/pretrain.py:shakespeare_bpe --workdir /tmp/shakespeare_bpe
    flaxlm pretrain --config configs/pretrain.py:125m --workdir /mnt/shared/runs/125m \\
        --config.data.name=c4/en:3.1.0 --config.data.data_dir=gs://BUCKET/tfds
    flaxlm compile --config configs/pretrain.py:1b --config.mesh.preset=v5e-8

Any key can be overridden: `--config.optim.lr=1e-3 --config.model.num_layers=4`.
Presets: tiny (seconds, tests), shakespeare_char, shakespeare_bpe, and 125m / 350m / 1b /
7b for TPU/GPU on C4-style TFDS text: FSDP over every chip, with gradient accumulation and
remat chosen so `flaxlm compile` (CPU estimate) puts 125m and 1b under a v5e chip's 16 GiB;
check a preset and mesh with `flaxlm compile` before paying for a slice. The workdir is a
local or shared (e.g. gcsfuse-mounted) path; gs:// URLs are not read directly.
"""

from __future__ import annotations

import pathlib

import ml_collections

from configs.base import base_config

SHARED_SHAKESPEARE = (
    pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
)

PRESETS = ("tiny", "shakespeare_char", "shakespeare_bpe", "125m", "350m", "1b", "7b")


def _shakespeare(c: ml_collections.ConfigDict) -> None:
    c.data.name = "tiny_shakespeare"
    c.data.local_copy = str(SHARED_SHAKESPEARE) if SHARED_SHAKESPEARE.exists() else ""
    c.eval.name = "tiny_shakespeare"
    c.eval.split = "validation+test"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = arg or "tiny"
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {PRESETS}")
    c = base_config()
    c.stage = "pretrain"
    if preset == "tiny":
        # Seconds on a laptop: a char tokenizer on a few lines of Shakespeare.
        _shakespeare(c)
        c.data.tokenizer_type = "char"
        c.model.preset = "tiny"
        c.total_steps, c.batch_size, c.seq_len = 20, 8, 64
        c.optim.lr, c.optim.warmup_steps = 3e-3, 2
        c.log.every_steps, c.eval.every_steps, c.eval.max_batches = 5, 10, 2
        c.checkpoint.every_steps = 10
    elif preset == "shakespeare_char":
        _shakespeare(c)
        c.data.tokenizer_type = "char"
        c.model.preset = "tiny"
        c.model.d_model, c.model.num_layers, c.model.num_heads = 128, 4, 4
        c.model.num_kv_heads, c.model.head_dim, c.model.mlp_dim = 4, 32, 512
        c.model.max_seq_len = 256
        # Unrolled layers: 113 ms vs 153 ms per step on the 2-core CPU (docs/benchmarks.md);
        # four layers compile quickly either way.
        c.model.scan_layers = False
        c.total_steps, c.batch_size, c.seq_len = 2000, 12, 64
        c.optim.lr, c.optim.warmup_steps, c.optim.weight_decay = 2e-3, 100, 0.1
        c.optim.b2 = 0.99
        c.log.every_steps, c.eval.every_steps, c.eval.max_batches = 50, 250, 0
        c.checkpoint.every_steps = 500
    elif preset == "shakespeare_bpe":
        _shakespeare(c)
        c.data.tokenizer_type, c.data.vocab_size = "bpe", 4096
        c.model.preset = "10m"
        c.model.vocab_size = 4096
        c.total_steps, c.batch_size, c.seq_len = 2000, 16, 256
        c.optim.lr, c.optim.warmup_steps = 1e-3, 100
        c.log.every_steps, c.eval.every_steps = 50, 250
        c.checkpoint.every_steps = 500
    else:
        c.data.name, c.data.tokenizer_type, c.data.vocab_size = "c4/en:3.1.0", "bpe", 32000
        c.eval.name, c.eval.split, c.eval.max_batches = "c4/en:3.1.0", "validation", 50
        c.model.preset = preset
        c.seq_len = 2048
        c.batch_size = {"125m": 256, "350m": 256, "1b": 512, "7b": 1024}[preset]
        c.total_steps = {"125m": 20_000, "350m": 40_000, "1b": 100_000, "7b": 250_000}[preset]
        c.optim.lr = {"125m": 6e-4, "350m": 3e-4, "1b": 3e-4, "7b": 1.5e-4}[preset]
        c.optim.warmup_steps = 2000
        # Microbatches and remat so activations fit next to the FSDP-sharded state.
        c.grad_accum_steps = {"125m": 8, "350m": 16, "1b": 64, "7b": 64}[preset]
        if preset in ("125m", "350m"):
            c.model.remat_policy = "dots_with_no_batch_dims_saveable"
        c.mesh.strategy = "fsdp"
        c.mesh.data, c.mesh.fsdp = 1, -1  # FSDP over every chip of the host/slice
        c.log.every_steps, c.eval.every_steps = 50, 2000
        c.checkpoint.every_steps, c.checkpoint.max_to_keep = 1000, 3
    return c
