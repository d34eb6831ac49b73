"""The one training loop every stage uses: steps, logging, eval, checkpoints, preemption.

A stage supplies a jitted `train_step(state, batch) -> (state, metrics)`, an iterator of
host batches with `get_state()/set_state()` (grain's protocol), a function that turns a
host batch into global device arrays, and optional eval/sample hooks. The loop owns
everything else, so resume, preemption and non-finite handling behave the same in every
stage.

Exactness: the RNG lives in the state and the data position in the checkpoint, so
stopping at a checkpoint and rerunning gives the same metrics as never stopping.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from train import cpu
from train.checkpoint import Checkpointer
from train.metrics import MetricWriter, mfu
from train.signals import SignalFlag


class Preempted(SystemExit):
    """Raised after a SIGTERM/SIGINT-triggered checkpoint; exit code 128 + signal."""

    def __init__(self, signum: int, step: int) -> None:
        super().__init__(128 + signum)
        self.signum, self.step = signum, step


class NonFiniteLossError(RuntimeError):
    pass


@dataclasses.dataclass
class LoopSettings:
    total_steps: int
    tokens_per_step: int  # input tokens per global batch, for tokens/s
    log_every: int = 10
    eval_every: int = 0  # 0: no periodic eval
    checkpoint_every: int = 0  # 0: checkpoint only at the end (and on preemption)
    flops_per_token: float = 0.0  # 0: no MFU
    peak_flops_per_device: float = 0.0
    stop_at_step: int = 0  # > 0: checkpoint and return at this step (time-boxed jobs)
    nonfinite: str = "stop"  # stop: raise NonFiniteLossError; skip: the step discarded the update
    desc: str = "train"


class _SignalFlag(SignalFlag):
    """Records SIGTERM/SIGINT instead of dying, so the loop can checkpoint first."""

    def agreed(self) -> int:
        """The signal seen by any host (all hosts must stop at the same step)."""
        if jax.process_count() == 1:
            return self.signum
        return int(np.max(multihost_utils.process_allgather(np.int32(self.signum))))


def _finite(metrics: dict[str, float]) -> bool:
    return all(math.isfinite(v) for k, v in metrics.items() if k in ("loss", "grad_norm"))


def format_eval(metrics: dict[str, Any]) -> str:
    """Numbers on one line; text (e.g. a generated sample) on lines of its own."""
    numbers = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
    texts = "".join(f"\n  {k}: {v!r}" for k, v in metrics.items() if isinstance(v, str))
    return numbers + texts


def train_loop(
    state: Any,
    train_step: Callable[[Any, Any], tuple[Any, dict]],
    batches: Iterator,
    to_device: Callable[[Any], Any],
    checkpointer: Checkpointer,
    meta: dict,
    writer: MetricWriter,
    settings: LoopSettings,
    eval_fn: Callable[[Any], dict[str, float]] | None = None,
) -> Any:
    """Run from `state.step` to `settings.total_steps`; returns the final state.

    Raises Preempted (after saving) on SIGTERM/SIGINT and NonFiniteLossError (without saving)
    when a loss or gradient norm is NaN/inf.
    """
    start = int(state.step)
    s = settings
    bar = tqdm(
        total=s.total_steps,
        initial=start,
        desc=s.desc,
        dynamic_ncols=True,
        disable=jax.process_index() != 0,
        mininterval=1.0,
    )
    pending: list[tuple[int, dict]] = []  # device metrics not yet fetched
    sync_each_step = cpu.sync_every_step()
    last_saved = start
    window_start, window_steps = time.perf_counter(), 0

    def flush(step: int) -> dict[str, float]:
        """Fetch pending metrics, check them all, log the latest."""
        nonlocal window_start, window_steps
        host = [(i, {k: float(v) for k, v in jax.device_get(m).items()}) for i, m in pending]
        pending.clear()
        for i, m in host:
            if not _finite(m) and s.nonfinite == "stop":
                raise NonFiniteLossError(
                    f"non-finite loss or gradient at step {i} "
                    f"(loss={m.get('loss')}, grad_norm={m.get('grad_norm')}); "
                    "no checkpoint was written after it"
                )
        elapsed = time.perf_counter() - window_start
        latest = dict(host[-1][1])
        latest["tokens_per_sec"] = window_steps * s.tokens_per_step / max(elapsed, 1e-9)
        if s.flops_per_token and s.peak_flops_per_device:
            latest["mfu"] = mfu(
                latest["tokens_per_sec"], s.flops_per_token, s.peak_flops_per_device
            )
        writer.write(step, latest)
        bar.set_postfix(
            loss=f"{latest['loss']:.4f}",
            tok_s=f"{latest['tokens_per_sec']:,.0f}",
            mfu=f"{latest.get('mfu', 0.0):.1%}",
            refresh=False,
        )
        window_start, window_steps = time.perf_counter(), 0
        return latest

    def save(step: int, metrics: dict | None = None) -> None:
        nonlocal last_saved
        if pending:
            flush(step)  # never checkpoint a state whose loss was not checked
        checkpointer.save(step, state, batches.get_state(), meta, metrics)
        last_saved = step

    with _SignalFlag() as signals:
        try:
            for step in range(start + 1, s.total_steps + 1):
                state, metrics = train_step(state, to_device(next(batches)))
                pending.append((step, metrics))
                window_steps += 1
                if step == start + 1:  # the first step compiles: keep it out of tokens/s
                    jax.block_until_ready(metrics)
                    window_start, window_steps = time.perf_counter(), 0
                elif sync_each_step:
                    jax.block_until_ready(metrics)
                bar.update(1)
                if step % s.log_every == 0 or step == s.total_steps:
                    flush(step)
                eval_metrics = None
                if (
                    eval_fn is not None
                    and s.eval_every
                    and (step % s.eval_every == 0 or step == s.total_steps)
                ):
                    if pending:
                        flush(step)
                    eval_metrics = eval_fn(state)
                    writer.write(step, eval_metrics)
                    bar.write(f"step {step}: " + format_eval(eval_metrics))
                    eval_metrics = {
                        k: v for k, v in eval_metrics.items() if isinstance(v, (int, float))
                    }
                if (s.checkpoint_every and step % s.checkpoint_every == 0) or step == s.total_steps:
                    save(step, eval_metrics)
                if step == s.stop_at_step:
                    if last_saved != step:
                        save(step)
                    bar.write(
                        f"stopped at step {step} (stop_at_step); rerun to continue", file=sys.stderr
                    )
                    break
                signum = signals.agreed()
                if signum:
                    if last_saved != step:
                        save(step)
                    checkpointer.wait()
                    bar.write(
                        f"{signal.Signals(signum).name} at step {step}: checkpoint "
                        "saved; rerun the same command to resume",
                        file=sys.stderr,
                    )
                    raise Preempted(signum, step)
        finally:
            bar.close()
            checkpointer.wait()
    return state
