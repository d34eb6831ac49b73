"""Memory and step time of full fine-tuning against LoRA, SFT-style, on SmolLM2-135M's shape.

    python benchmarks/lora_memory.py [--batch 4 --seq 256 --steps 3 --runs 3 --rank 8]

Three configurations: full fine-tuning, LoRA as the model runs it (each adapted
projection adds x A B, model/layers.py) and LoRA merged the way it ran before (W + s A B
formed for each forward; its backward forms every adapted kernel's full gradient).
Random weights (no download: the same shapes give the same memory and time). Each
configuration runs in a fresh process (peak host RSS is per process) for `--runs` runs:
one train step of train/step.py (the LM step every SFT run uses, AdamW, fp32 parameters
and compute) is compiled, then `--steps` steps are timed after one warm-up step.
Printed per configuration: the compiled step's `memory_analysis()` (arguments = state +
batch, outputs = new state + metrics, temporaries = activations, gradients, merged
weights), the optimizer state's size, trainable parameter count, peak host RSS and the
median step time over all runs. On an accelerator it also prints the device's peak bytes
in use. CPU device memory statistics do not exist, so on CPU the compiled sizes are the
device-side figures.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import jax
import numpy as np

from model import lora
from model import sharding as sh
from model.config import ModelConfig, param_count
from model.transformer import Transformer
from train.optim import make_optimizer
from train.state import create_train_state
from train.step import jit_train_step, make_train_step

SMOLLM2_135M = ModelConfig(
    vocab_size=49152,
    d_model=576,
    num_layers=30,
    num_heads=9,
    num_kv_heads=3,
    head_dim=64,
    mlp_dim=1536,
    max_seq_len=2048,
    rope_theta=100_000.0,
    tie_embeddings=True,
    dtype="float32",
    param_dtype="float32",
)
MIB = 2**20


def nbytes(tree: object) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


class MergedLora(lora.LoraModel):
    """LoRA applied as it was before the adapter path of model/layers.py: W + s A B merged
    for every forward, so the backward pass forms each adapted kernel's full gradient."""

    def apply(self, variables: dict, *args, **kwargs):
        params = lora.merge(variables["params"], self.lora.scale)
        return self.base.apply({**variables, "params": params}, *args, **kwargs)


def measure(rank: int, batch: int, seq: int, steps: int, merged: bool = False) -> dict:
    """One configuration in this process: compiled sizes, RSS, step times (seconds)."""
    model = lora.wrap(Transformer(SMOLLM2_135M), lora.LoraConfig(rank, 2.0 * max(rank, 1)))
    if merged:
        model = MergedLora(model.base, model.lora)
    mesh = sh.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    rules = sh.get_rules("fsdp")
    tx, lr_fn = make_optimizer(lr=1e-4, total_steps=100, weight_decay=0.0)
    state, shardings = create_train_state(model, tx, mesh, rules, seed=0)
    step = jit_train_step(make_train_step(model, tx, lr_fn), shardings, mesh, rules)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, SMOLLM2_135M.vocab_size, (batch, seq + 1)).astype(np.int32)
    batch_arrays = {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "loss_mask": np.ones((batch, seq), np.float32),
    }
    placed = jax.device_put(batch_arrays, sh.batch_sharding(mesh, rules))
    start = time.perf_counter()
    compiled = step.lower(state, placed).compile()
    compile_s = time.perf_counter() - start
    mem = compiled.memory_analysis()
    out = {
        "rank": rank,
        "compile_s": compile_s,
        "params": lora.count(state.params),
        "trainable": lora.count(lora.trainable(state.params)),
        "opt_state_mib": nbytes(state.opt_state) / MIB,
        "argument_mib": mem.argument_size_in_bytes / MIB,
        "output_mib": mem.output_size_in_bytes / MIB,
        "alias_mib": mem.alias_size_in_bytes / MIB,
        "temp_mib": mem.temp_size_in_bytes / MIB,
        "gflops_per_step": _flops(compiled) / 1e9,
    }
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        state, metrics = step(state, placed)
        jax.block_until_ready(metrics["loss"])
        if i:  # the first call is the warm-up
            times.append(time.perf_counter() - t0)
    out["step_s"] = times
    out["loss"] = float(metrics["loss"])
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        out["device_peak_mib"] = stats["peak_bytes_in_use"] / MIB
    return out


def _flops(compiled) -> float:
    """XLA's count of the compiled step's floating-point operations (0 where unknown)."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float((cost or {}).get("flops", 0.0))


def report(label: str, runs: list[dict]) -> dict:
    first = runs[0]
    times = [t for r in runs for t in r["step_s"]]
    total = first["argument_mib"] + first["output_mib"] + first["temp_mib"]
    summary = {
        "config": label,
        "trainable_params": first["trainable"],
        "params": first["params"],
        "opt_state_MiB": round(first["opt_state_mib"], 1),
        "compiled_argument_MiB": round(first["argument_mib"], 1),
        "compiled_output_MiB": round(first["output_mib"], 1),
        "compiled_alias_MiB": round(first["alias_mib"], 1),
        "compiled_temp_MiB": round(first["temp_mib"], 1),
        "compiled_temp+arg+out_MiB": round(total, 1),
        "compiled_GFLOP_per_step": round(first["gflops_per_step"], 1),
        "peak_rss_MiB_per_run": [round(r["peak_rss_mib"]) for r in runs],
        "median_step_s": round(statistics.median(times), 3),
        "step_s_all": [round(t, 3) for t in times],
        "compile_s_per_run": [round(r["compile_s"], 1) for r in runs],
    }
    if "device_peak_mib" in first:
        summary["device_peak_MiB_per_run"] = [round(r["device_peak_mib"]) for r in runs]
    print(json.dumps(summary), flush=True)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per run")
    parser.add_argument("--runs", type=int, default=3, help="fresh processes per configuration")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank (alpha = 2 * rank)")
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--merged", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:  # a child: one run of one configuration
        print(json.dumps(measure(args.one, args.batch, args.seq, args.steps, args.merged)))
        return
    print(
        f"SmolLM2-135M shape ({param_count(SMOLLM2_135M) / 1e6:.1f} M parameters, fp32), "
        f"batch {args.batch} x {args.seq}, AdamW, {jax.default_backend()}",
        flush=True,
    )
    configs = {
        "full": ["--one", "0"],
        f"lora r={args.rank} (all 7 projections)": ["--one", str(args.rank)],
        f"lora r={args.rank}, merged W + sAB (before)": ["--one", str(args.rank), "--merged"],
    }
    runs: dict[str, list[dict]] = {label: [] for label in configs}
    for _ in range(args.runs):  # interleaved, so load on a shared machine hits all alike
        for label, flags in configs.items():
            cmd = [sys.executable, __file__, *flags]
            cmd += ["--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps)]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            runs[label].append(json.loads(done.stdout.strip().splitlines()[-1]))
    for label, config_runs in runs.items():
        report(label, config_runs)


if __name__ == "__main__":
    main()
