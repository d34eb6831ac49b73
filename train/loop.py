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


class _Run:
    """The loop's bookkeeping between steps: device metrics not yet fetched, the tokens/s
    window, the last saved step and the progress bar."""

    def __init__(
        self,
        start: int,
        settings: LoopSettings,
        batches: Iterator,
        checkpointer: Checkpointer,
        meta: dict,
        writer: MetricWriter,
    ) -> None:
        self.start, self.s = start, settings
        self.batches, self.checkpointer, self.meta, self.writer = (
            batches,
            checkpointer,
            meta,
            writer,
        )
        self.bar = tqdm(
            total=settings.total_steps,
            initial=start,
            desc=settings.desc,
            dynamic_ncols=True,
            disable=jax.process_index() != 0,
            mininterval=1.0,
        )
        self.pending: list[tuple[int, dict]] = []  # device metrics not yet fetched
        self.sync_each_step = cpu.sync_every_step()
        self.last_saved = start
        self.window_start, self.window_steps = time.perf_counter(), 0

    def record(self, step: int, metrics: dict) -> None:
        """Queue a step's device metrics (fetched at the next flush) and count it."""
        self.pending.append((step, metrics))
        self.window_steps += 1
        if step == self.start + 1:  # the first step compiles: keep it out of tokens/s
            jax.block_until_ready(metrics)
            self.window_start, self.window_steps = time.perf_counter(), 0
        elif self.sync_each_step:
            jax.block_until_ready(metrics)
        self.bar.update(1)

    def check_pending(self) -> list[tuple[int, dict[str, float]]]:
        """Fetch the pending metrics and check them all (NonFiniteLossError under
        nonfinite=stop); returns them, (step, metrics) in step order."""
        host = [(i, {k: float(v) for k, v in jax.device_get(m).items()}) for i, m in self.pending]
        self.pending.clear()
        for i, m in host:
            if not _finite(m) and self.s.nonfinite == "stop":
                raise NonFiniteLossError(
                    f"non-finite loss or gradient at step {i} "
                    f"(loss={m.get('loss')}, grad_norm={m.get('grad_norm')}); "
                    "no checkpoint was written after it"
                )
        return host

    def flush(self, step: int) -> dict[str, float]:
        """Fetch pending metrics, check them all, log the latest."""
        s = self.s
        host = self.check_pending()
        elapsed = time.perf_counter() - self.window_start
        latest = dict(host[-1][1])
        latest["tokens_per_sec"] = self.window_steps * s.tokens_per_step / max(elapsed, 1e-9)
        if s.flops_per_token and s.peak_flops_per_device:
            latest["mfu"] = mfu(
                latest["tokens_per_sec"], s.flops_per_token, s.peak_flops_per_device
            )
        self.writer.write(step, latest)
        self.bar.set_postfix(
            loss=f"{latest['loss']:.4f}",
            tok_s=f"{latest['tokens_per_sec']:,.0f}",
            mfu=f"{latest.get('mfu', 0.0):.1%}",
            refresh=False,
        )
        self.window_start, self.window_steps = time.perf_counter(), 0
        return latest

    def evaluate(
        self, step: int, state: Any, eval_fn: Callable[[Any], dict[str, float]] | None
    ) -> dict[str, float] | None:
        """Run `eval_fn` when due; its numeric metrics (for keep_best), else None."""
        s = self.s
        due = s.eval_every and (step % s.eval_every == 0 or step == s.total_steps)
        if eval_fn is None or not due:
            return None
        if self.pending:
            self.flush(step)
        eval_metrics = eval_fn(state)
        self.writer.write(step, eval_metrics)
        self.bar.write(f"step {step}: " + format_eval(eval_metrics))
        return {k: v for k, v in eval_metrics.items() if isinstance(v, (int, float))}

    def save(self, step: int, state: Any, metrics: dict | None = None) -> None:
        if self.pending:
            self.flush(step)  # never checkpoint a state whose loss was not checked
        self.checkpointer.save(step, state, self.batches.get_state(), self.meta, metrics)
        self.last_saved = step

    def save_unless_saved(self, step: int, state: Any) -> None:
        """The save of a stop between log steps (a signal, stop_at_step): its metrics are
        checked but not logged, so a resumed run's metrics.jsonl has the same lines as an
        uninterrupted one."""
        if self.last_saved != step:
            self.check_pending()
            self.save(step, state)


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
    s = settings
    run = _Run(int(state.step), s, batches, checkpointer, meta, writer)
    with _SignalFlag() as signals:
        try:
            for step in range(run.start + 1, s.total_steps + 1):
                state, metrics = train_step(state, to_device(next(batches)))
                run.record(step, metrics)
                if step % s.log_every == 0 or step == s.total_steps:
                    run.flush(step)
                eval_metrics = run.evaluate(step, state, eval_fn)
                if (s.checkpoint_every and step % s.checkpoint_every == 0) or step == s.total_steps:
                    run.save(step, state, eval_metrics)
                if step == s.stop_at_step:
                    run.save_unless_saved(step, state)
                    run.bar.write(
                        f"stopped at step {step} (stop_at_step); rerun to continue", file=sys.stderr
                    )
                    break
                signum = signals.agreed()
                if signum:
                    run.save_unless_saved(step, state)
                    checkpointer.wait()
                    run.bar.write(
                        f"{signal.Signals(signum).name} at step {step}: checkpoint "
                        "saved; rerun the same command to resume",
                        file=sys.stderr,
                    )
                    raise Preempted(signum, step)
        finally:
            run.bar.close()
            checkpointer.wait()
    return state
