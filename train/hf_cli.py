"""`flaxlm export-hf --workdir DIR --out HF_DIR [--step N]` and
`flaxlm import-hf --hf HF_DIR --workdir DIR`: Llama, Qwen2, Mistral and Gemma 1/2/3
weights in and out (the families and what is refused: model/hf.py).

Export writes what `AutoModelForCausalLM.from_pretrained(HF_DIR)` and
`AutoTokenizer.from_pretrained(HF_DIR)` load with no code of ours: `config.json`,
`model.safetensors` (or shards + index above `--max-shard-bytes`),
`generation_config.json` and the tokenizer files (model/hf_tokenizer.py). A reward model
(a checkpoint whose meta says it has a scalar head) exports as the family's
XForSequenceClassification with one label; HF's score layer has no bias, so the
flaxlm `scalar_bias` and the reward calibration (gain, bias) go into config.json under
"flaxlm": reward = gain * (HF logit + scalar_bias) + bias.

Import writes a workdir whose checkpoint 0 reads like a pretraining checkpoint (stage
"import-hf", the model dict, the tokenizer copied when the HF dir has a sentencepiece
model with flaxlm's fixed special ids), so `--config.init_from=DIR` starts SFT or RLHF
from it. Parameters stream from the safetensors files straight into their shards
(model/hf.py), so models larger than host memory import; on several hosts every process
runs the same command and reads the shards it holds (the HF dir must be visible to all).
The checkpoint holds parameters only (no optimizer state): it is a starting point.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from model import hf, hf_files
from model import sharding as sh
from model.config import ModelConfig
from model.hf_tokenizer import write_hf_tokenizer
from model.pretrained_tokenizer import is_pretrained_dir, load_pretrained_tokenizer
from model.tokenizer import (
    BOS_ID,
    END_ID,
    EOS_ID,
    MODEL_FILE,
    PAD_ID,
    AnyTokenizer,
    Tokenizer,
    check_vocab,
)
from model.tokenizer import load_tokenizer as load_any_tokenizer
from model.transformer import Transformer
from train.checkpoint import Checkpointer
from train.integrity import write_json
from train.parent import lineage, load_params, read_parent
from train.stage import TOKENIZER_DIR
from train.state import abstract_sharded_params

STAGE = "import-hf"
CALIBRATION_FILE = "reward_calibration.json"  # written by `flaxlm reward`


class HFCommandError(ValueError):
    """Bad input to export-hf / import-hf: one line on stderr, exit code 2."""


# ----------------------------------------------------------------------------- shared


def placement(
    model: Transformer, mesh_shape: Sequence[int] | None, strategy: str
) -> tuple[jax.sharding.Mesh, sh.Rules, Any]:
    """(mesh, rules, abstract params). Without `mesh_shape`: FSDP over every device when
    the shapes divide, else one device (small or oddly shaped models)."""
    rules = sh.get_rules(strategy)
    if mesh_shape is not None:
        # A shape without -1 may use fewer devices than there are (the first ones).
        devices = None if -1 in mesh_shape else jax.devices()[: math.prod(mesh_shape)]
        mesh = sh.make_mesh(*mesh_shape, devices=devices)
        return mesh, rules, abstract_sharded_params(model, mesh, rules)
    try:
        mesh = sh.make_mesh(1, -1, 1)
        return mesh, rules, abstract_sharded_params(model, mesh, rules)
    except ValueError:
        mesh = sh.make_mesh(1, 1, 1, devices=jax.devices()[:1])
        return mesh, rules, abstract_sharded_params(model, mesh, rules)


def parse_mesh(text: str | None) -> tuple[int, int, int] | None:
    if text is None:
        return None
    try:
        data, fsdp, tensor = (int(x) for x in text.split(","))
    except ValueError:
        raise HFCommandError(f"--mesh={text!r}: expected DATA,FSDP,TENSOR, e.g. 1,-1,1") from None
    return data, fsdp, tensor


# ----------------------------------------------------------------------------- export


def generation_config(tokenizer: AnyTokenizer | None = None) -> dict[str, Any]:
    """Greedy by default; generation ends at eos or at the end-of-turn marker. The ids are
    the tokenizer's (flaxlm's fixed ids when there is none)."""
    if tokenizer is None:
        bos, stops, pad = BOS_ID, [EOS_ID, END_ID], PAD_ID
    else:
        bos, stops, pad = tokenizer.bos_id, list(tokenizer.stop_ids), tokenizer.pad_id
    return {"bos_token_id": bos, "eos_token_id": stops, "pad_token_id": pad, "do_sample": False}


def parent_tokenizer(parent: Any) -> AnyTokenizer | None:
    """The checkpoint's tokenizer, either kind, or None when it records none."""
    directory = parent.tokenizer_dir
    if directory is None or not (
        (directory / MODEL_FILE).is_file() or is_pretrained_dir(directory)
    ):
        return None
    return load_any_tokenizer(directory)


def reward_extra(workdir: pathlib.Path, step: int, params: Any) -> dict[str, Any]:
    """config.json's "flaxlm" block of a reward model: scalar bias and calibration."""
    extra: dict[str, Any] = {"scalar_bias": float(hf.to_host(params["scalar_bias"]))}
    path = workdir / CALIBRATION_FILE
    if path.is_file():
        calibration = json.loads(path.read_text())
        if calibration.get("step") == step:
            extra["calibration"] = {k: calibration[k] for k in ("gain", "bias")}
    return extra


def export_hf(
    source: str | os.PathLike,
    out: str | os.PathLike,
    step: int | None = None,
    dtype: str = "float32",
    max_shard_bytes: int = hf_files.DEFAULT_SHARD_BYTES,
    model_type: str | None = None,
) -> list[str]:
    """Export a flaxlm checkpoint (a workdir's newest, or `step`) to `out`; returns files.

    model_type: the HF family to write (None: the one the model config needs,
    `hf.family_for`); a family that cannot represent the model is refused by field.
    """
    if jax.process_count() > 1:
        raise HFCommandError("export-hf runs on one host (it gathers every tensor)")
    if dtype not in hf_files.DTYPES:
        raise HFCommandError(f"--dtype={dtype!r}: choose from {sorted(hf_files.DTYPES)}")
    source = pathlib.Path(source)
    parent = read_parent(source / "checkpoints" / str(step) if step is not None else source)
    heads = {"lm_head": True, "scalar_head": False, **(parent.meta.get("heads") or {})}
    reward = bool(heads["scalar_head"])
    if reward == heads["lm_head"]:
        raise HFCommandError(f"{parent.checkpoint}: heads {heads} are neither an LM nor a reward")
    cfg = ModelConfig(**parent.model)
    extra = {"checkpoint": str(parent.checkpoint), "step": parent.step, "stage": parent.stage}
    # Refuses what the family cannot represent before loading anything.
    tokenizer = parent_tokenizer(parent)
    ids = {}
    if tokenizer is not None:
        ids = {"pad_id": tokenizer.pad_id, "eos_id": tokenizer.eos_id}
        ids["bos_id"] = tokenizer.eos_id if tokenizer.bos_id is None else tokenizer.bos_id
    config = hf.config_to_hf(cfg, reward=reward, dtype=dtype, model_type=model_type, **ids)
    out = pathlib.Path(out)
    if out.is_dir() and any(out.glob("model*.safetensors*")):
        raise HFCommandError(f"--out={out} already holds model weights; pick an empty directory")
    model = Transformer(cfg, **heads)
    _, _, target = placement(model, None, "fsdp")
    params = load_params(parent, target)
    if reward:
        extra |= reward_extra(parent.workdir, parent.step, params)
    entries = {e.name: e for e in hf.entries(cfg, heads["lm_head"], reward)}
    shapes = [
        (name, e.tensor.hf_shape(_layer_shape(target, e, cfg))) for name, e in entries.items()
    ]
    files = hf_files.write_safetensors(
        out,
        shapes,
        lambda name: hf.hf_tensor(params, entries[name], cfg),
        dtype,
        max_shard_bytes,
    )
    hf_files.write_json(out / hf_files.CONFIG_FILE, config | {"flaxlm": extra})
    hf_files.write_json(out / "generation_config.json", generation_config(tokenizer))
    if isinstance(tokenizer, Tokenizer):
        write_hf_tokenizer(tokenizer, out, cfg.max_seq_len)
    elif tokenizer is not None:  # a pretrained model's own files, as they came
        tokenizer.save(out)
    else:
        print(f"export-hf: {parent.checkpoint} records no tokenizer; none written", file=sys.stderr)
    return files


def _layer_shape(target: Any, entry: hf.Entry, cfg: ModelConfig) -> tuple[int, ...]:
    shape = tuple(hf.flax_leaf(target, entry, cfg.scan_layers).shape)
    return shape[1:] if entry.layer is not None and cfg.scan_layers else shape


# ----------------------------------------------------------------------------- import


def hf_tokenizer(hf_dir: pathlib.Path, vocab_size: int) -> AnyTokenizer | None:
    """The HF dir's tokenizer: a sentencepiece model with flaxlm's fixed special ids, else
    the checkpoint's own tokenizer.json + tokenizer_config.json (model/pretrained_tokenizer.py),
    else None."""
    path = hf_dir / MODEL_FILE
    if not path.is_file():
        if not is_pretrained_dir(hf_dir):
            return None
        tokenizer = load_pretrained_tokenizer(hf_dir)
        check_vocab(vocab_size, tokenizer, allow_padding=True)
        return tokenizer
    try:
        tokenizer = Tokenizer(path.read_bytes(), source=str(path))
    except (ValueError, RuntimeError) as err:
        print(
            f"import-hf: tokenizer not copied ({str(err).splitlines()[0][:200]}); "
            "later stages need --config.data.tokenizer",
            file=sys.stderr,
        )
        return None
    check_vocab(vocab_size, tokenizer, allow_padding=True)
    return tokenizer


def import_hf(
    hf_dir: str | os.PathLike,
    workdir: str | os.PathLike,
    dtype: str | None = None,
    mesh_shape: Sequence[int] | None = None,
    strategy: str = "fsdp",
    scan_layers: bool = True,
) -> pathlib.Path:
    """Import an HF model directory (Llama, Qwen2, Mistral, Gemma 1/2/3) into a new flaxlm
    workdir; returns its checkpoint dir."""
    hf_dir, workdir = pathlib.Path(hf_dir).resolve(), pathlib.Path(workdir).resolve()
    hf_config = hf_files.read_config(hf_dir)
    try:
        cfg, reward = hf.config_from_hf(hf_config, dtype, scan_layers=scan_layers)
    except hf.UnsupportedConfigError as err:  # name the file the bad key is in
        raise hf.UnsupportedConfigError(f"{hf_dir / hf_files.CONFIG_FILE}: {err}") from None
    heads = {"lm_head": not reward, "scalar_head": reward}
    reader = hf_files.SafetensorsDir(hf_dir)
    hf.check_names(reader.names(), cfg, heads["lm_head"], reward)
    tokenizer = hf_tokenizer(hf_dir, cfg.vocab_size)
    refuse_used_workdir(workdir)
    model = Transformer(cfg, **heads)
    _, _, target = placement(model, mesh_shape, strategy)
    bias = float((hf_config.get("flaxlm") or {}).get("scalar_bias", 0.0))
    try:
        params = hf.params_from_hf(reader.get, cfg, target, heads["lm_head"], reward, bias)
    finally:
        reader.close()
    config = {"stage": STAGE, "hf_dir": str(hf_dir), "hf_config": hf_config}
    save = None if tokenizer is None else tokenizer.save
    fingerprint = None if tokenizer is None else tokenizer.fingerprint
    return write_imported(
        workdir, str(hf_dir), STAGE, config, cfg, heads, params, fingerprint, save
    )


def refuse_used_workdir(workdir: pathlib.Path) -> None:
    """An import writes a new workdir: one that holds checkpoints is refused."""
    if (workdir / "checkpoints").is_dir() and any((workdir / "checkpoints").iterdir()):
        raise HFCommandError(f"--workdir={workdir} already holds checkpoints")


def write_imported(
    workdir: pathlib.Path,
    source: str,
    stage: str,
    config: dict[str, Any],
    cfg: ModelConfig,
    heads: dict[str, bool],
    params: Any,
    tokenizer_fingerprint: str | None,
    save_tokenizer: Any = None,
) -> pathlib.Path:
    """An imported model's workdir: config.json, the tokenizer (`save_tokenizer(dir)`, when
    there is one) and checkpoint 0 holding the parameters only, with the meta every stage
    reads (stage, model, heads, tokenizer, lineage from `source`). Returns the checkpoint
    dir."""
    tokenizer = None
    if tokenizer_fingerprint is not None:
        tokenizer = {"path": TOKENIZER_DIR, "fingerprint": tokenizer_fingerprint}
    meta = {
        "stage": stage,
        "config": config,
        "model": cfg.to_dict(),
        "heads": heads,
        "tokenizer": tokenizer,
        "lineage": lineage(stage, source),
    }
    workdir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        if save_tokenizer is not None:
            save_tokenizer(workdir / TOKENIZER_DIR)
        write_json(workdir / "config.json", {**config, "model": cfg.to_dict()})
    checkpointer = Checkpointer(workdir, max_to_keep=1, async_save=False)
    checkpointer.save(0, {"step": jnp.zeros((), jnp.int32), "params": params}, None, meta)
    checkpointer.close()
    return workdir / "checkpoints" / "0"


# ----------------------------------------------------------------------------- mains


def _run(prog: str, fn: Any) -> int:
    try:
        fn()
    except (HFCommandError, hf.UnsupportedConfigError, ValueError, FileNotFoundError) as err:
        print(f"flaxlm {prog}: error: {err}", file=sys.stderr)
        return 2
    return 0


def export_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="flaxlm export-hf",
        description="export a checkpoint as a Hugging Face Llama, Qwen2, Mistral or Gemma model",
    )
    parser.add_argument("--workdir", required=True, help="a flaxlm run directory")
    parser.add_argument("--out", required=True, help="the Hugging Face model directory to write")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default newest)")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    parser.add_argument(
        "--max-shard-bytes",
        type=int,
        default=hf_files.DEFAULT_SHARD_BYTES,
        help="split files above",
    )
    parser.add_argument(
        "--model-type",
        default=None,
        help=f"HF family: {', '.join(hf.SUPPORTED)} (default: the one the model needs)",
    )
    args = parser.parse_args(argv)

    def go() -> None:
        files = export_hf(
            args.workdir, args.out, args.step, args.dtype, args.max_shard_bytes, args.model_type
        )
        print(f"wrote {args.out}: {', '.join(files)}")

    return _run("export-hf", go)


def add_import_args(parser: argparse.ArgumentParser, dtype_help: str) -> None:
    """The options every import command shares: where to write, and the placement."""
    parser.add_argument("--workdir", required=True, help="the flaxlm workdir to create")
    parser.add_argument("--dtype", default=None, help=dtype_help)
    parser.add_argument("--mesh", default=None, help="DATA,FSDP,TENSOR (default FSDP over all)")
    parser.add_argument("--strategy", default="fsdp", help="dp, fsdp, tp or fsdp_tp")
    parser.add_argument("--no-scan", action="store_true", help="per-layer params (layers_i)")


def import_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="flaxlm import-hf",
        description="import a Hugging Face Llama, Qwen2, Mistral or Gemma model as a checkpoint",
    )
    parser.add_argument("--hf", required=True, help="directory with config.json + safetensors")
    add_import_args(parser, "compute dtype (default: the checkpoint's)")
    args = parser.parse_args(argv)

    def go() -> None:
        path = import_hf(
            args.hf,
            args.workdir,
            args.dtype,
            parse_mesh(args.mesh),
            args.strategy,
            scan_layers=not args.no_scan,
        )
        print(f"wrote {path}; start SFT with --config.init_from={args.workdir}")

    return _run("import-hf", go)
