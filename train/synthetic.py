"""`flaxlm quicktrain`: a few train steps of a preset on synthetic tokens, loss printed.

The synthetic task is counting modulo the vocabulary from a random start (row r is
s_r, s_r+1, s_r+2, ...), so the loss visibly falls within tens of steps. It exercises the
whole sharded path: mesh, sharded state creation, the jitted train step.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from model import sharding as sh
from model.config import PRESETS, flops_per_token, get_preset, param_count
from model.transformer import Transformer
from train.optim import make_optimizer
from train.state import create_train_state
from train.step import jit_train_step, make_train_step


def counting_batch(
    rng: np.random.Generator, batch: int, seq_len: int, vocab: int
) -> dict[str, jax.Array]:
    """[B, T] inputs/targets of the counting task (targets = inputs shifted by one)."""
    starts = rng.integers(0, vocab, (batch, 1))
    seq = (starts + np.arange(seq_len + 1)[None, :]) % vocab
    return {
        "inputs": jnp.asarray(seq[:, :-1], jnp.int32),
        "targets": jnp.asarray(seq[:, 1:], jnp.int32),
        "loss_mask": jnp.ones((batch, seq_len), jnp.float32),
    }


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="flaxlm quicktrain", description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--strategy", default="fsdp", choices=sorted(sh.RULES))
    p.add_argument("--mesh", default="-1,1,1", help="data,fsdp,tensor sizes (-1 = the rest)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1 or args.seq_len < 2:
        p.error("--steps and --batch-size must be >= 1 and --seq-len >= 2")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    cfg = get_preset(args.preset)
    if args.seq_len > cfg.max_seq_len:
        raise SystemExit(
            f"--seq-len {args.seq_len} exceeds the preset's max_seq_len {cfg.max_seq_len}"
        )
    try:
        mesh = sh.make_mesh(*(int(x) for x in args.mesh.split(",")))
    except ValueError as err:
        raise SystemExit(f"flaxlm quicktrain: --mesh {args.mesh}: {err}") from None
    rules = sh.get_rules(args.strategy)
    model = Transformer(cfg)
    tx, lr_fn = make_optimizer(
        "adamw", lr=args.lr, total_steps=args.steps, warmup_steps=min(10, args.steps // 5)
    )
    state, shardings = create_train_state(model, tx, mesh, rules, args.seed)
    step = jit_train_step(make_train_step(model, tx, lr_fn), shardings, mesh, rules)
    print(
        f"{args.preset}: {param_count(cfg) / 1e6:.2f}M params, mesh {dict(mesh.shape)}, "
        f"strategy {args.strategy}, {jax.device_count()} {jax.devices()[0].platform} device(s)"
    )
    rng = np.random.default_rng(args.seed)
    tokens_per_step = args.batch_size * args.seq_len
    start = time.perf_counter()
    for i in range(args.steps):
        state, metrics = step(
            state, counting_batch(rng, args.batch_size, args.seq_len, cfg.vocab_size)
        )
        loss = float(metrics["loss"])
        if i == 0:
            compiled_at = time.perf_counter()
            print(f"step    1  loss {loss:.4f}  (compile + first step {compiled_at - start:.1f}s)")
        elif (i + 1) % max(1, args.steps // 10) == 0 or i + 1 == args.steps:
            rate = i * tokens_per_step / (time.perf_counter() - compiled_at)
            flops = rate * flops_per_token(cfg, args.seq_len) / 1e9
            print(f"step {i + 1:4d}  loss {loss:.4f}  {rate:,.0f} tokens/s  {flops:.2f} GFLOP/s")
        if not np.isfinite(loss):
            raise SystemExit(f"non-finite loss {loss} at step {i + 1}")
    return 0
