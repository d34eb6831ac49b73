"""Training wall time until the validation loss reaches a target (default 1.88 nats/char).

    python benchmarks/time_to_loss.py --config configs/pretrain.py:shakespeare_char \\
        [--target 1.88 --eval-every 100 --cores-as-devices N --config.KEY=VALUE ...]

Validation is the whole tiny_shakespeare validation+test split (the last 10% of the text)
cut into windows of the context length. The clock counts training only (compile
included, evaluation excluded) and stops at the first evaluation at or below the target.
`--cores-as-devices N` trains data parallel over N host devices, one per core
(train/cpu.py; sets mesh.data=N).
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import jax

from configs import loader
from train import cpu, pretrain


def main(argv: list[str]) -> int:
    rest, overrides = loader.split_argv(argv)
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/pretrain.py:shakespeare_char")
    parser.add_argument("--target", type=float, default=1.88)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--cores-as-devices", type=int, default=0)
    args = parser.parse_args(rest)
    if args.cores_as_devices:
        cpu.cores_as_devices(args.cores_as_devices)
        overrides = [*overrides, f"mesh.data={args.cores_as_devices}"]
    config = loader.load(args.config, overrides)
    config.eval.every_steps = 0  # the benchmark evaluates on its own schedule
    config.eval.max_batches = 0  # the whole split
    workdir = Path(tempfile.mkdtemp(prefix="ttl_"))
    parts = pretrain.build(config, workdir)
    config.eval.every_steps = args.eval_every
    eval_fn = pretrain.make_eval_fn(parts.model, config, parts.tokenizer, parts.mesh, parts.rules)
    state, step_fn, batches = parts.state, parts.train_step, parts.batches
    to_device = parts.to_device
    trained, compile_s = 0.0, None
    sync = cpu.sync_every_step()  # several CPU devices: a deep queue can hang XLA
    print(
        f"{config.total_steps} steps max, batch {config.batch_size} x {config.seq_len}, "
        f"model {loader.model_config(config)}"
    )
    for step in range(1, config.total_steps + 1):
        start = time.perf_counter()
        state, metrics = step_fn(state, to_device(next(batches)))
        if step == 1 or step % args.eval_every == 0 or sync:
            jax.block_until_ready(metrics)
        trained += time.perf_counter() - start
        if step == 1:
            compile_s = trained
        if step % args.eval_every == 0 or step == config.total_steps:
            eval_loss = eval_fn(state)["eval_loss"]
            tokens = step * config.batch_size * config.seq_len
            print(
                f"step {step:5d}  train {trained:6.1f} s  loss {float(metrics['loss']):.4f}  "
                f"val {eval_loss:.4f}  ({tokens / trained:,.0f} tokens/s incl. compile)",
                flush=True,
            )
            if eval_loss <= args.target:
                mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
                print(
                    f"reached val {eval_loss:.4f} <= {args.target} at step {step} after "
                    f"{trained:.1f} s of training (compile {compile_s:.1f} s, step "
                    f"{(trained - compile_s) / (step - 1) * 1e3:.1f} ms, peak host memory "
                    f"{mem:.0f} MiB)"
                )
                return 0
    print(f"did not reach {args.target} in {config.total_steps} steps ({trained:.1f} s)")
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
