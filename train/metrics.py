"""Run outputs: metrics.jsonl, TensorBoard events (tensorboardX, no TensorFlow), MFU.

Only process 0 writes. On resume, lines logged after the restored step (by a run that died
before its next checkpoint) are dropped, so metrics.jsonl keeps one line per logged step.
"""

from __future__ import annotations

import json
import math
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp

# Dense bf16 peak FLOP/s per chip, from the vendors' data sheets.
PEAK_FLOPS_BY_KIND = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "L4": 121e12,
}


def measure_matmul_flops(size: int = 1024, repeats: int = 5, dtype: Any = jnp.float32) -> float:
    """Peak matmul FLOP/s of device 0, measured: median of `repeats` timed [size]^2 matmuls."""
    a = jnp.ones((size, size), dtype)
    chain = jax.jit(lambda x: x @ a @ a @ a @ a)  # four matmuls per call, one dispatch
    chain(a).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        chain(a).block_until_ready()
        times.append(time.perf_counter() - start)
    return 4 * 2 * size**3 / sorted(times)[len(times) // 2]


def peak_flops_per_device(override: float = 0.0) -> float:
    """The configured peak, else the data-sheet figure for the device kind, else measured
    (CPU and unknown chips): MFU is then relative to what this machine's matmul reaches.
    CPU devices of one host share its cores (train/cpu.py), so each gets its share of the
    host's measured peak."""
    if override > 0:
        return override
    kind = jax.devices()[0].device_kind
    for name, flops in PEAK_FLOPS_BY_KIND.items():
        if name.lower() in kind.lower():
            return flops
    measured = measure_matmul_flops()
    if jax.default_backend() == "cpu":
        return measured / jax.local_device_count()
    return measured


def mfu(tokens_per_sec: float, flops_per_token: float, peak_per_device: float) -> float:
    return tokens_per_sec * flops_per_token / (peak_per_device * jax.device_count())


def _jsonable(value: Any) -> Any:
    value = float(value) if not isinstance(value, (str, bool, int)) else value
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible as strings
    return value


class MetricWriter:
    """Appends one JSON object per logged step to metrics.jsonl and mirrors scalars to
    TensorBoard under <workdir>/tb."""

    def __init__(self, workdir: str | pathlib.Path, resume_step: int = 0) -> None:
        self.enabled = jax.process_index() == 0
        self.path = pathlib.Path(workdir) / "metrics.jsonl"
        self._tb = None
        if not self.enabled:
            return
        self._truncate_after(resume_step)
        from tensorboardX import SummaryWriter  # imported late: it is slow to import

        self._tb = SummaryWriter(logdir=str(pathlib.Path(workdir) / "tb"), flush_secs=10)

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = [
            line
            for line in self.path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step
        ]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(self.path)

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _jsonable(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(workdir: str | pathlib.Path) -> list[dict[str, Any]]:
    path = pathlib.Path(workdir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
