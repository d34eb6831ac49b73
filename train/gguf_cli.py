"""`flaxlm import-gguf --gguf FILE --workdir DIR`: a llama.cpp GGUF file as a checkpoint.

Writes the workdir `flaxlm import-hf` writes (checkpoint 0 reads like a pretraining
checkpoint, parameters only, so `--config.init_from=DIR` starts SFT or RLHF from it),
with stage "import-gguf". Every tensor is dequantized to fp32 with gguf's numpy code and
streamed into its shards (model/gguf.py, model/hf.py); torch is never imported. The
tokenizer becomes a Hugging Face tokenizer directory at DIR/tokenizer/
(model/gguf_tokenizer.py); meta["tokenizer"] is {"path": "tokenizer", "fingerprint":
sha256 of tokenizer.json + tokenizer_config.json, first 16 hex digits}. config.json
records the GGUF path, its tensor types ({"Q4_1": 210, ...}) and the derived HF config.

Everything is validated (architecture, tensor types, names, tokenizer) before anything
is written; bad input is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
import sys
from collections.abc import Sequence

import jax

from model import hf
from model.gguf import GGUFError, GGUFModel
from model.gguf_tokenizer import fingerprint, tokenizer_files, write_files
from model.transformer import Transformer
from train.hf_cli import (
    HFCommandError,
    add_import_args,
    parse_mesh,
    placement,
    refuse_used_workdir,
    write_imported,
)

STAGE = "import-gguf"


def import_gguf(
    gguf_path: str | os.PathLike,
    workdir: str | os.PathLike,
    dtype: str | None = None,
    mesh_shape: Sequence[int] | None = None,
    strategy: str = "fsdp",
    scan_layers: bool = True,
) -> pathlib.Path:
    """Import a GGUF file into a new flaxlm workdir; returns its checkpoint directory.

    dtype: the compute dtype (None: float32, the dequantized weights' dtype).
    """
    gguf_path, workdir = pathlib.Path(gguf_path).resolve(), pathlib.Path(workdir).resolve()
    model_file = GGUFModel(gguf_path)
    hf_config = model_file.hf_config()
    try:
        cfg, _ = hf.config_from_hf(hf_config, dtype, scan_layers=scan_layers)
    except hf.UnsupportedConfigError as err:
        raise GGUFError(f"{gguf_path}: {err}") from None
    try:
        hf.check_names(model_file.names(), cfg)
    except ValueError as err:
        raise GGUFError(f"{gguf_path}: {err}") from None
    files = tokenizer_files(model_file)
    refuse_used_workdir(workdir)
    heads = {"lm_head": True, "scalar_head": False}
    mesh, _, target = placement(Transformer(cfg, **heads), mesh_shape, strategy)
    # Shards of one stacked parameter each read all its layers: keep one parameter's
    # worth of dequantized tensors so each is dequantized once (model/gguf.py).
    leaves = jax.tree.leaves(target)
    model_file.cache_bytes = 0 if mesh.size == 1 else max(4 * math.prod(x.shape) for x in leaves)
    params = hf.params_from_hf(model_file.read, cfg, target)
    model_file.clear_cache()
    config = {
        "stage": STAGE,
        "gguf": str(gguf_path),
        "gguf_types": model_file.types(),
        "hf_config": hf_config,
    }
    return write_imported(
        workdir,
        str(gguf_path),
        STAGE,
        config,
        cfg,
        heads,
        params,
        fingerprint(files),
        lambda directory: write_files(files, directory),
    )


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="flaxlm import-gguf",
        description="import a llama.cpp GGUF file (llama architecture) as a checkpoint",
    )
    parser.add_argument("--gguf", required=True, help="the .gguf file")
    add_import_args(parser, "compute dtype (default float32)")
    args = parser.parse_args(argv)
    try:
        path = import_gguf(
            args.gguf,
            args.workdir,
            args.dtype,
            parse_mesh(args.mesh),
            args.strategy,
            scan_layers=not args.no_scan,
        )
    except (GGUFError, HFCommandError, hf.UnsupportedConfigError, ValueError) as err:
        print(f"flaxlm import-gguf: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path}; start SFT with --config.init_from={args.workdir}")
    return 0
