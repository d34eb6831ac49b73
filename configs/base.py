"""Keys every stage shares. Stage config files start from `base_config()` and override.

`model.preset` names a ModelConfig preset; every other `model.<field>` left at None takes
the preset's value (so `--config.model.num_layers=4` changes one field of the preset).
`model.lora.*` (rank, alpha, targets) configures LoRA (model/lora.py); it is not a
ModelConfig field.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from model.config import ModelConfig
from model.lora import DEFAULT_TARGETS


def model_section(preset: str = "tiny") -> ml_collections.ConfigDict:
    section = {"preset": preset}
    section.update({f.name: None for f in dataclasses.fields(ModelConfig)})
    # Low-rank adapters (model/lora.py): rank 0 = off; update scaled by alpha / rank.
    section["lora"] = {"rank": 0, "alpha": 16.0, "targets": DEFAULT_TARGETS}
    return ml_collections.ConfigDict(section)


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.stage = "pretrain"
    c.seed = 0
    c.total_steps = 100
    c.stop_at_step = 0  # > 0: checkpoint and exit at this step; rerun to continue
    c.batch_size = 8  # global, in sequences
    c.seq_len = 64
    c.grad_accum_steps = 1
    c.z_loss = 0.0
    c.nonfinite = "stop"  # stop | skip (discard the update and count it)
    c.init_from = ""  # a workdir or checkpoint to start from (later stages)
    c.model = model_section()
    c.optim = ml_collections.ConfigDict(
        {
            "name": "adamw",
            "lr": 3e-4,
            "schedule": "cosine",
            "warmup_steps": 0,
            "min_lr_ratio": 0.1,
            "decay_fraction": 0.2,
            "weight_decay": 0.1,
            "b1": 0.9,
            "b2": 0.95,
            "eps": 1e-8,
            "clip_norm": 1.0,
            "ns_steps": 5,  # muon: Newton-Schulz iterations per orthogonalization
        }
    )
    # mesh.preset: a slice name from configs/meshes.py (v5e-16, 8xH100, ...) that sets the four
    # other keys; explicit --config.mesh.* overrides still win.
    c.mesh = ml_collections.ConfigDict(
        {"data": -1, "fsdp": 1, "tensor": 1, "strategy": "fsdp", "preset": ""}
    )
    c.data = ml_collections.ConfigDict(
        {
            "name": "",
            "path": "",
            "split": "train",
            "data_dir": "",
            "local_copy": "",
            "text_key": "text",
            "doc_mode": "blank_line",
            # skip | fail: what a bad line, or a chat record longer than seq_len (never cut:
            # train/data/fit.py), does; skip counts it, fail stops naming file:line.
            "bad_records": "skip",
            "packing": "first_fit",
            "tokenizer": "",
            "tokenizer_type": "bpe",
            "vocab_size": 4096,
            "num_workers": 0,
            # True: ignore the checkpoint's data position (e.g. after changing the number of
            # hosts, whose shards it records) and restart the pipeline from its beginning.
            "reset_position": False,
        }
    )
    c.eval = ml_collections.ConfigDict(
        {
            "every_steps": 0,
            "name": "",
            "path": "",
            "split": "validation",
            "max_batches": 0,
            "batch_size": 0,
            "sample_prompt": "",
            "sample_tokens": 64,
        }
    )
    c.checkpoint = ml_collections.ConfigDict(
        {"every_steps": 0, "max_to_keep": 3, "keep_best": False, "async_save": True}
    )
    c.log = ml_collections.ConfigDict({"every_steps": 10, "peak_flops_per_device": 0.0})
    return c
