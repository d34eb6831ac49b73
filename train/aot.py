"""`flaxlm compile --config configs/pretrain.py:PRESET [--config.KEY=VALUE ...]`: will it fit?

Ahead-of-time check before paying for a slice: the train step of a config is built as
`flaxlm pretrain` builds it (model, optimizer, mesh, shardings, batch shape) and lowered
and compiled on abstract inputs only: `jax.eval_shape` gives the state, ShapeDtypeStructs
carry the NamedShardings of state and batch. No data is read, no parameter allocated.
The compiled executable's memory analysis gives what one device needs.

    flaxlm compile --config configs/pretrain.py:1b --config.mesh.preset=v5e-8
    flaxlm compile --config configs/pretrain.py:1b --fake-devices 8 --device-memory-gib 16

`--fake-devices N` compiles for N CPU devices on any machine. The sharding and the
per-device state are exact there; activations and temporaries are what the CPU compiler
allocates (TPU and GPU compilers fuse and lay out differently), so the verdict is an
estimate: rerun on the slice itself (seconds to minutes) before a long job. The memory
limit is `--device-memory-gib`, else the mesh preset's HBM, else the device's own.
Exit status: 0 fits (or no limit known), 1 does not fit, 2 bad config.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

GIB = 1024**3
LM_STAGES = ("pretrain", "sft")


@dataclasses.dataclass(frozen=True)
class MemoryReport:
    """Bytes per device. `peak` = arguments + outputs - aliased (donated) + temporaries,
    or the compiler's own peak figure when it reports a larger one."""

    params: int
    opt_state: int
    batch: int
    arguments: int
    outputs: int
    aliased: int
    temporaries: int
    code: int
    compiler_peak: int

    @property
    def peak(self) -> int:
        total = self.arguments + self.outputs - self.aliased + self.temporaries + self.code
        return max(total, self.compiler_peak)


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    from configs import loader  # light: no jax

    rest, overrides = loader.split_argv(argv)
    p = argparse.ArgumentParser(
        prog="flaxlm compile",
        description="lower and compile a config's train step, report memory per device",
    )
    p.add_argument("--config", help="configs/FILE.py[:PRESET] (required)")
    p.add_argument("--fake-devices", type=int, default=0, help="compile for N CPU devices")
    p.add_argument("--device-memory-gib", type=float, default=0.0, help="memory of one device")
    p.add_argument(
        "--usable-fraction",
        type=float,
        default=0.9,
        help="share of device memory the run may plan on (runtime and fragmentation)",
    )
    p.add_argument("--list-meshes", action="store_true", help="print the mesh presets and exit")
    args = p.parse_args(rest)
    if not args.config and not args.list_meshes:
        p.error("--config is required")
    return args, overrides


def use_fake_devices(count: int) -> None:
    """Make the CPU backend expose `count` devices (before jax's backend starts)."""
    import jax

    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    try:
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", count)
    except Exception:  # the backend already started (e.g. inside tests): check it instead
        pass
    if jax.device_count() != count:
        raise ValueError(f"--fake-devices={count}, but jax already has {jax.device_count()}")


def model_config_for_compile(config: Any) -> Any:
    """The ModelConfig; a vocab left to the tokenizer is taken as data.vocab_size, padded
    to a multiple of 128 as the stages do."""
    from configs import loader

    if config.model.vocab_size is None:
        config = config.copy_and_resolve_references()
        config.model.vocab_size = -(-int(config.data.vocab_size) // 128) * 128
    return loader.model_config(config)


def abstract_batch(batch_size: int, seq_len: int, mesh: Any, rules: Any) -> dict[str, Any]:
    """ShapeDtypeStructs of a packed LM batch [B, T], sharded over the batch axes."""
    import jax
    import jax.numpy as jnp

    from model import sharding as sh

    sharding = sh.batch_sharding(mesh, rules)
    ints = ("inputs", "targets", "positions", "segment_ids")
    batch = {
        k: jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32, sharding=sharding) for k in ints
    }
    batch["loss_mask"] = jax.ShapeDtypeStruct((batch_size, seq_len), jnp.float32, sharding=sharding)
    return batch


def bytes_per_device(abstract: Any) -> int:
    """Bytes of one device's shard, summed over a tree of sharded ShapeDtypeStructs."""
    import math

    import jax
    import numpy as np

    return sum(
        math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
        for x in jax.tree.leaves(abstract)
    )


def compile_train_step(config: Any) -> tuple[Any, MemoryReport, dict[str, float]]:
    """Lower and compile the LM train step of `config` on abstract inputs.

    Returns (compiled executable, memory per device, timings in seconds)."""
    from model import sharding as sh
    from model.transformer import Transformer
    from train.checkpoint import abstract_with_shardings
    from train.optim import optimizer_from_config
    from train.state import state_shardings
    from train.step import jit_train_step, make_train_step

    if config.get("stage", "pretrain") not in LM_STAGES:
        raise ValueError(f"stage={config.stage!r}: flaxlm compile handles {LM_STAGES} configs")
    mesh = sh.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    rules = sh.get_rules(config.mesh.strategy)
    model = Transformer(model_config_for_compile(config))
    tx, lr_fn = optimizer_from_config(config)
    abstract, shardings = state_shardings(model, tx, mesh, rules)
    state = abstract_with_shardings(abstract, shardings)
    batch = abstract_batch(config.batch_size, config.seq_len, mesh, rules)
    step = make_train_step(
        model, tx, lr_fn, config.grad_accum_steps, config.z_loss,
        skip_nonfinite=config.nonfinite == "skip",
    )  # fmt: skip
    jitted = jit_train_step(step, shardings, mesh, rules)
    start = time.perf_counter()
    lowered = jitted.lower(state, batch)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    done = time.perf_counter()
    stats = compiled.memory_analysis()
    report = MemoryReport(
        params=bytes_per_device(state.params),
        opt_state=bytes_per_device(state.opt_state),
        batch=bytes_per_device(batch),
        arguments=int(stats.argument_size_in_bytes),
        outputs=int(stats.output_size_in_bytes),
        aliased=int(stats.alias_size_in_bytes),
        temporaries=int(stats.temp_size_in_bytes),
        code=int(stats.generated_code_size_in_bytes),
        compiler_peak=int(getattr(stats, "peak_memory_in_bytes", 0) or 0),
    )
    timings = {"lower_s": lowered_at - start, "compile_s": done - lowered_at}
    return compiled, report, timings


def device_memory_bytes(config: Any, flag_gib: float) -> tuple[int | None, str]:
    """The memory limit of one device and where it came from."""
    import jax

    from configs.meshes import get_mesh_preset

    if flag_gib > 0:
        return int(flag_gib * GIB), "--device-memory-gib"
    if config.mesh.get("preset"):
        preset = get_mesh_preset(config.mesh.preset)
        return int(preset.hbm_gib * GIB), f"mesh.preset={config.mesh.preset}"
    device = jax.devices()[0]
    if device.platform != "cpu":
        limit = (device.memory_stats() or {}).get("bytes_limit")
        if limit:
            return int(limit), f"{device.device_kind} memory_stats"
    return None, "unknown"


def verdict(peak: int, limit: int | None, usable: float) -> tuple[bool | None, str]:
    """(fits?, one line). None when no limit is known."""
    if limit is None:
        return None, "no device memory given (--device-memory-gib): no verdict"
    budget = limit * usable
    share = peak / limit
    if peak <= budget:
        return True, f"FITS: {peak / GIB:.2f} GiB of {limit / GIB:.1f} GiB per device ({share:.0%})"
    return False, (
        f"DOES NOT FIT: {peak / GIB:.2f} GiB needed, {limit / GIB:.1f} GiB per device "
        f"({share:.0%}; budget {usable:.0%}). Try --config.grad_accum_steps (smaller "
        "microbatches), a larger mesh.fsdp, or --config.model.remat_policy=full"
    )


def format_report(config: Any, report: MemoryReport, timings: dict[str, float]) -> str:
    import jax

    r = report
    mesh = config.mesh
    lines = [
        f"model {config.model.preset}, batch {config.batch_size} x {config.seq_len}, "
        f"grad_accum {config.grad_accum_steps}, mesh data={mesh.data} fsdp={mesh.fsdp} "
        f"tensor={mesh.tensor} ({mesh.strategy}) on {jax.device_count()} "
        f"{jax.devices()[0].platform} devices",
        f"lower {timings['lower_s']:.1f} s, compile {timings['compile_s']:.1f} s",
        "memory per device (GiB):",
        f"  params        {r.params / GIB:8.3f}",
        f"  optimizer     {r.opt_state / GIB:8.3f}",
        f"  batch         {r.batch / GIB:8.3f}",
        f"  arguments     {r.arguments / GIB:8.3f}",
        f"  outputs       {r.outputs / GIB:8.3f}  (aliased with donated arguments: "
        f"{r.aliased / GIB:.3f})",
        f"  temporaries   {r.temporaries / GIB:8.3f}",
        f"  peak          {r.peak / GIB:8.3f}",
    ]
    if jax.devices()[0].platform == "cpu":
        lines.append("  (CPU compiler: temporaries are an estimate of what a TPU/GPU needs)")
    return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
    from configs import loader

    args, overrides = parse_args(argv)
    if args.list_meshes:
        from configs.meshes import preset_table

        print(preset_table())
        return 0
    try:
        if args.fake_devices:
            use_fake_devices(args.fake_devices)
        from configs.meshes import apply_mesh_preset

        config = apply_mesh_preset(loader.load(args.config, overrides), overrides)
        _, report, timings = compile_train_step(config)
        limit, source = device_memory_bytes(config, args.device_memory_gib)
    except (loader.ConfigError, ValueError, TypeError) as err:
        print(f"flaxlm compile: error: {err}", file=sys.stderr)
        return 2
    import jax

    fits, line = verdict(report.peak, limit, args.usable_fraction)
    if jax.process_index() == 0:
        print(format_report(config, report, timings))
        print(f"{line} [limit from {source}]")
    return 1 if fits is False else 0
