"""Training throughput and MFU of a small char-level model, against this machine's peak.

    python benchmarks/pretrain_throughput.py [--steps 60 --repeats 5 --unrolled]
    XLA_FLAGS=--xla_force_host_platform_device_count=2 \\
        python benchmarks/pretrain_throughput.py --unrolled --data 2
    python benchmarks/pretrain_throughput.py --unrolled --cores-as-devices 2

Shape: 4 layers, 4 heads, d_model 128, context 64, batch 12, char-level vocabulary
(the shakespeare_char tokenizer: its pieces padded to a multiple of 128). The peak is the
median fp32 matmul FLOP/s measured in the same run, before each round of steps. Prints
compile time, step time, tokens/s, MFU and peak host memory. `--data N` splits the batch
over N host devices (data parallel; XLA_FLAGS must provide them). `--cores-as-devices N`
makes N host devices, one per core (train/cpu.py), and splits the batch over them.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import jax
import numpy as np

from model import sharding as sh
from model.config import ModelConfig, flops_per_token, param_count
from model.transformer import Transformer
from train import cpu
from train.metrics import measure_matmul_flops
from train.optim import make_optimizer
from train.state import create_train_state
from train.step import jit_train_step, make_train_step

SHAPE = ModelConfig(
    vocab_size=384,
    d_model=128,
    num_layers=4,
    num_heads=4,
    num_kv_heads=4,
    head_dim=32,
    mlp_dim=512,
    max_seq_len=64,
    dtype="float32",
)
BATCH, SEQ = 12, 64


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--unrolled", action="store_true", help="scan_layers=False")
    parser.add_argument("--data", type=int, default=1, help="data-parallel host devices")
    parser.add_argument(
        "--cores-as-devices",
        type=int,
        default=0,
        help="N host devices (one per core), data parallel",
    )
    args = parser.parse_args()
    if args.cores_as_devices:
        cpu.cores_as_devices(args.cores_as_devices)
        args.data = args.cores_as_devices
    if args.data > len(jax.devices()):
        parser.error(
            f"--data {args.data}: only {len(jax.devices())} device(s); set "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={args.data}"
        )
    shape = SHAPE.replace(scan_layers=not args.unrolled)
    mesh = sh.make_mesh(args.data, 1, 1, devices=jax.devices()[: args.data])
    rules = sh.get_rules("dp")
    model = Transformer(shape)
    tx, lr_fn = make_optimizer(lr=1e-3, total_steps=10_000, warmup_steps=10)
    state, shardings = create_train_state(model, tx, mesh, rules, seed=0)
    step = jit_train_step(make_train_step(model, tx, lr_fn), shardings, mesh, rules)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 65, (BATCH, SEQ + 1))
    batch = {
        "inputs": np.asarray(tokens[:, :-1], np.int32),
        "targets": np.asarray(tokens[:, 1:], np.int32),
        "loss_mask": np.ones((BATCH, SEQ), np.float32),
    }
    # Placed as the step expects it, as the data pipeline does (train/data/pipelines.py).
    batch = jax.device_put(batch, sh.batch_sharding(mesh, rules))
    sync = cpu.sync_every_step()
    start = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - start
    peaks, rates = [], []
    for _ in range(args.repeats):
        peaks.append(measure_matmul_flops(size=1024, repeats=7))
        start = time.perf_counter()
        for _ in range(args.steps):
            state, metrics = step(state, batch)
            if sync:  # several CPU devices: a deep queue can hang XLA (train/cpu.py)
                jax.block_until_ready(metrics)
        jax.block_until_ready(metrics)
        rates.append(args.steps * BATCH * SEQ / (time.perf_counter() - start))
    peak, rate = statistics.median(peaks), statistics.median(rates)
    fpt = flops_per_token(shape, SEQ)
    print(
        f"jax {jax.__version__} on {jax.devices()[0].device_kind}; "
        f"{param_count(shape) / 1e6:.2f}M params, scan_layers={shape.scan_layers}, "
        f"data-parallel devices {args.data}, "
        f"{fpt / 1e6:.2f} MFLOP/token"
    )
    print(f"peak fp32 matmul: {peak / 1e9:.1f} GFLOP/s (median of {args.repeats})")
    print(f"compile + first step: {compile_s:.2f} s")
    print(
        f"step time: {BATCH * SEQ / rate * 1e3:.2f} ms; tokens/s: {rate:,.0f} "
        f"(median of {args.repeats} x {args.steps} steps; all: "
        f"{', '.join(f'{r:,.0f}' for r in rates)})"
    )
    print(f"MFU: {rate * fpt / peak:.1%} (median tokens/s x FLOP/token / median peak)")
    print(f"peak host memory: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
