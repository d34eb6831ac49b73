"""Compile time of the jitted train step versus depth, with and without nn.scan.

    python benchmarks/compile_time.py [--repeats 3]

Prints the median lower+compile seconds for 2 and 24 layers (tiny widths) and their ratio.
With scan the program is one loop body whatever the depth, so the ratio should stay < 2.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from model import sharding as sh
from model.config import get_preset
from model.transformer import Transformer
from train.optim import make_optimizer
from train.state import create_train_state
from train.step import jit_train_step, make_train_step


def compile_seconds(num_layers: int, scan: bool) -> float:
    cfg = get_preset("tiny").replace(num_layers=num_layers, scan_layers=scan)
    mesh = sh.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    rules = sh.get_rules("dp")
    model = Transformer(cfg)
    tx, lr_fn = make_optimizer(lr=1e-3, total_steps=100)
    state, shardings = create_train_state(model, tx, mesh, rules, seed=0)
    step = jit_train_step(make_train_step(model, tx, lr_fn), shardings, mesh, rules)
    tokens = jnp.zeros((8, 64), jnp.int32)
    batch = {"inputs": tokens, "targets": tokens, "loss_mask": jnp.ones((8, 64))}
    start = time.perf_counter()
    step.lower(state, batch).compile()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}, median of {args.repeats}")
    for scan in (True, False):
        times = {}
        for layers in (2, 24):
            times[layers] = statistics.median(
                compile_seconds(layers, scan) for _ in range(args.repeats)
            )
        print(
            f"scan_layers={scan!s:5}  2 layers {times[2]:.2f}s  24 layers {times[24]:.2f}s  "
            f"ratio {times[24] / times[2]:.2f}"
        )


if __name__ == "__main__":
    main()
