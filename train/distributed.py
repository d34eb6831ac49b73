"""Multi-host start-up: `jax.distributed.initialize` once, hosts agreeing on the config, and
the data position of every host in the checkpoint.

Every host runs the same `flaxlm` command; JAX's multi-controller runtime is the engine.
Where the coordinator, process count and process id come from, first match wins:

1. flags `--coordinator HOST:PORT --num-processes N --process-id I` (stripped from argv
   by `flaxlm` before the stage parses it), else the env variables FLAXLM_COORDINATOR,
   FLAXLM_NUM_PROCESSES, FLAXLM_PROCESS_ID;
2. SLURM (SLURM_NTASKS > 1): the first node of the job's node list, SLURM_PROCID,
   SLURM_NTASKS; port FLAXLM_COORDINATOR_PORT, else derived from SLURM_JOB_ID;
3. a Cloud TPU VM: JAX's own detection (worker list from the TPU metadata);
4. otherwise one process, and nothing is initialized.

`--distributed off` (FLAXLM_DISTRIBUTED=off) skips all of it. A peer that does not show up
within `--init-timeout` seconds (FLAXLM_INIT_TIMEOUT, default 300) ends every waiting
process with one line naming the coordinator and the count, not a hang or a C++ abort.
FLAXLM_LOCAL_DEVICE_IDS=0,1 restricts a process to some local GPUs (one process per GPU);
by default a process drives all devices of its host.

On CPU (tests) the processes use gloo collectives, so several processes on 127.0.0.1
behave like several hosts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import re
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

START_FAILED_EXIT = 4  # exit status when the processes cannot all connect
DEFAULT_INIT_TIMEOUT = 300
FLAGS = {
    "--coordinator": "coordinator",
    "--num-processes": "num_processes",
    "--process-id": "process_id",
    "--init-timeout": "init_timeout",
    "--distributed": "mode",
}
MODES = ("auto", "off")


class StartupError(RuntimeError):
    """The distributed settings are incomplete or inconsistent (reported as one line)."""


class ConfigMismatchError(ValueError):
    """Hosts resolved different configs (the message names the keys and processes)."""


class DataStateError(ValueError):
    """A checkpoint's data position does not fit this run's processes."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """What `start` does. coordinator None with initialize=True: JAX detects (TPU VM)."""

    initialize: bool
    coordinator: str | None = None
    num_processes: int = 1
    process_id: int = 0
    local_device_ids: tuple[int, ...] | None = None
    init_timeout: int = DEFAULT_INIT_TIMEOUT
    source: str = "single host"


def pop_flags(argv: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """Split the distributed flags (`--flag value` or `--flag=value`) off argv."""
    found: dict[str, str] = {}
    rest: list[str] = []
    i = 0
    while i < len(argv):
        name, eq, value = argv[i].partition("=")
        if name in FLAGS:
            if not eq:
                if i + 1 >= len(argv):
                    raise StartupError(f"{name}: missing value")
                value = argv[i + 1]
                i += 1
            found[FLAGS[name]] = value
        else:
            rest.append(argv[i])
        i += 1
    return found, rest


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list: 'gpu[003-005,9],cpu1' -> 'gpu003'."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match or not match.group(1):
        raise StartupError(f"cannot read the SLURM node list {nodelist!r}")
    prefix, ranges = match.groups()
    if ranges is None:
        return prefix
    return prefix + re.split(r"[-,]", ranges)[0]


def _int(value: str, name: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise StartupError(f"{name}={value!r}: expected an integer") from None


def _on_cloud_tpu_vm() -> bool:
    """True on a Cloud TPU VM with chips attached (set by jax at import from the PCI ids)."""
    if importlib.util.find_spec("libtpu") is None:  # cheap: no jax import off TPU VMs
        return False
    try:
        from jax._src import cloud_tpu_init  # private, but the flag JAX's detection uses
    except ImportError:
        return False
    return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))


def plan_from(flags: Mapping[str, str], env: Mapping[str, str], on_tpu_vm: bool = False) -> Plan:
    """Resolve flags and environment into a Plan (pure; see the module docstring)."""
    mode = flags.get("mode", env.get("FLAXLM_DISTRIBUTED", "auto")) or "auto"
    if mode not in MODES:
        raise StartupError(f"--distributed={mode!r}: choose from {MODES}")
    timeout = _int(
        flags.get("init_timeout", env.get("FLAXLM_INIT_TIMEOUT", str(DEFAULT_INIT_TIMEOUT))),
        "--init-timeout",
    )
    if timeout < 1:
        raise StartupError(f"--init-timeout={timeout}: must be >= 1 second")
    if mode == "off":
        return Plan(False, source="--distributed off")
    local = env.get("FLAXLM_LOCAL_DEVICE_IDS", "")
    local_ids = tuple(_int(x, "FLAXLM_LOCAL_DEVICE_IDS") for x in local.split(",") if x.strip())
    explicit = {
        "coordinator": flags.get("coordinator", env.get("FLAXLM_COORDINATOR", "")),
        "num_processes": flags.get("num_processes", env.get("FLAXLM_NUM_PROCESSES", "")),
        "process_id": flags.get("process_id", env.get("FLAXLM_PROCESS_ID", "")),
    }
    common = {"local_device_ids": local_ids or None, "init_timeout": timeout}
    if any(explicit.values()):
        count = _int(explicit["num_processes"] or "1", "--num-processes")
        if count == 1:
            return Plan(False, source="one process")
        missing = [k.replace("_", "-") for k, v in explicit.items() if not v]
        if missing:
            raise StartupError(
                f"{count} processes need --{', --'.join(missing)} "
                "(or FLAXLM_COORDINATOR / FLAXLM_NUM_PROCESSES / FLAXLM_PROCESS_ID)"
            )
        pid = _int(explicit["process_id"], "--process-id")
        if not 0 <= pid < count:
            raise StartupError(f"--process-id={pid}: must be in 0..{count - 1}")
        if ":" not in explicit["coordinator"]:
            raise StartupError(f"--coordinator={explicit['coordinator']!r}: expected HOST:PORT")
        return Plan(True, explicit["coordinator"], count, pid, source="flags/env", **common)
    if _int(env.get("SLURM_NTASKS", "1"), "SLURM_NTASKS") > 1:
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "")
        port = env.get("FLAXLM_COORDINATOR_PORT") or str(
            20000 + _int(env.get("SLURM_JOB_ID", "0"), "SLURM_JOB_ID") % 20000
        )
        return Plan(
            True,
            f"{first_slurm_host(nodes)}:{port}",
            _int(env["SLURM_NTASKS"], "SLURM_NTASKS"),
            _int(env.get("SLURM_PROCID", "0"), "SLURM_PROCID"),
            source="SLURM",
            **common,
        )
    if on_tpu_vm:
        return Plan(True, source="Cloud TPU VM", **common)
    return Plan(False)


def _watchdog(plan: Plan) -> threading.Timer:
    """Print one clear line and exit if the peers have not all connected in time.

    JAX's own deadline (set later than this one) aborts with a C++ stack trace."""

    def fire() -> None:
        who = (
            f"process {plan.process_id} of {plan.num_processes}"
            if plan.coordinator
            else "this host"
        )
        print(
            f"flaxlm: error: {who} could not reach all peers through the coordinator "
            f"{plan.coordinator or '(auto-detected)'} within {plan.init_timeout} s: a process "
            "is missing, died at start-up, or got another coordinator/process count. Start "
            "every process with the same --coordinator and --num-processes and its own "
            "--process-id.",
            file=sys.stderr,
            flush=True,
        )
        os._exit(START_FAILED_EXIT)

    timer = threading.Timer(plan.init_timeout, fire)
    timer.daemon = True
    return timer


def initialize(plan: Plan) -> None:
    """Run `plan`: jax.distributed.initialize (at most once), gloo on CPU, bounded wait."""
    import jax

    if not plan.initialize or jax.distributed.is_initialized():
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs: dict[str, Any] = {"initialization_timeout": plan.init_timeout + 30}
    if plan.coordinator is not None:
        kwargs |= {
            "coordinator_address": plan.coordinator,
            "num_processes": plan.num_processes,
            "process_id": plan.process_id,
            "local_device_ids": list(plan.local_device_ids) if plan.local_device_ids else None,
            # No cluster auto-detection: under SLURM it would limit each process to one GPU.
            "cluster_detection_method": "deactivate",
        }
    timer = _watchdog(plan)
    timer.start()
    started = time.perf_counter()
    try:
        jax.distributed.initialize(**kwargs)
    finally:
        timer.cancel()
    print(
        f"distributed: process {jax.process_index()} of {jax.process_count()} "
        f"({plan.source}), {jax.local_device_count()} local of {jax.device_count()} devices, "
        f"connected in {time.perf_counter() - started:.1f} s",
        file=sys.stderr,
    )


def start(argv: Sequence[str], env: Mapping[str, str] | None = None) -> list[str]:
    """Strip the distributed flags from argv, initialize if they or the env say so, and
    return the remaining argv. Raises StartupError on inconsistent settings."""
    flags, rest = pop_flags(argv)
    plan = plan_from(flags, os.environ if env is None else env, _on_cloud_tpu_vm())
    initialize(plan)
    return rest


# ---------------------------------------------------------------- cross-host agreement


def allgather_bytes(payload: bytes) -> list[bytes]:
    """Every process's `payload`, in process order (two small collectives)."""
    import jax
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return [payload]
    lengths = np.asarray(multihost_utils.process_allgather(np.int32(len(payload))))
    width = -(-int(lengths.max()) // 4096) * 4096 or 4096  # few distinct shapes to compile
    padded = np.zeros(width, np.uint8)
    padded[: len(payload)] = np.frombuffer(payload, np.uint8)
    rows = np.asarray(multihost_utils.process_allgather(padded))
    return [bytes(row[:n]) for row, n in zip(rows, lengths, strict=True)]


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1} (leaves compared one by one)."""
    if isinstance(tree, Mapping):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out |= flatten(value, f"{prefix}{key}.")
        return out
    return {prefix[:-1]: tree}


def describe_mismatch(trees: Sequence[Mapping[str, Any]], what: str = "config") -> str:
    """One line naming each key on which some process differs from process 0."""
    flat = [flatten(t) for t in trees]
    parts = []
    for pid, other in enumerate(flat[1:], start=1):
        keys = sorted(k for k in set(flat[0]) | set(other) if flat[0].get(k) != other.get(k))
        for key in keys[:5]:
            parts.append(
                f"{key}: process 0 has {flat[0].get(key)!r}, process {pid} has {other.get(key)!r}"
            )
        if len(keys) > 5:
            parts.append(f"... {len(keys) - 5} more keys on process {pid}")
    return (
        f"the hosts disagree on the {what} ({'; '.join(parts)}); start every host with the "
        "same command, files and package version"
    )


def check_same_everywhere(tree: Mapping[str, Any], what: str = "config") -> None:
    """Raise ConfigMismatchError on every process unless all hold an equal `tree`.

    Costs one all-gather of a 32-byte digest; the full trees are gathered only on a
    mismatch, to name the keys."""
    import jax

    if jax.process_count() == 1:
        return
    text = json.dumps(tree, sort_keys=True, default=str).encode()
    digests = allgather_bytes(hashlib.sha256(text).digest())
    if len(set(digests)) == 1:
        return
    trees = [json.loads(t) for t in allgather_bytes(text)]
    raise ConfigMismatchError(describe_mismatch(trees, what))


# ---------------------------------------------------------------- data position


def _concat(batches: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if len(batches) == 1:
        return dict(batches[0])
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


class GlobalDataIterator:
    """Host batches whose saved state holds the data position of every process.

    Orbax writes JSON items from process 0 only, so the iterator state of the other hosts
    would be lost; `get_state` (collective: call it on every process at the same step)
    gathers them all: {"process_count": n, "processes": [state_0, ..., state_{n-1}]}.
    `set_state` gives each process its own entry back. A state saved by another number
    of processes raises DataStateError, unless `reset` (data.reset_position): then the
    pipeline starts from its beginning.

    `local` may hold several shard iterators, read one after the other into one host
    batch: one process then stands in for several (tests compare 1 and 2 processes on
    the same global batches this way).
    """

    def __init__(self, local: Sequence[Iterator], reset: bool = False) -> None:
        self.local = list(local)
        self.reset = reset

    def __iter__(self) -> GlobalDataIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return _concat([next(it) for it in self.local])

    def get_state(self) -> dict[str, Any]:
        mine = json.dumps([it.get_state() for it in self.local]).encode()
        states = [s for blob in allgather_bytes(mine) for s in json.loads(blob)]
        return {"process_count": len(states), "processes": states}

    def set_state(self, saved: Mapping[str, Any]) -> None:
        import jax

        slots = jax.process_count() * len(self.local)
        if "process_count" not in saved:  # a state saved before this format: one process
            saved = {"process_count": 1, "processes": [dict(saved)]}
        if self.reset:
            print(
                f"data.reset_position: the data pipeline restarts from its beginning "
                f"(the checkpoint's position of {saved['process_count']} process(es) ignored)",
                file=sys.stderr,
            )
            return
        if saved["process_count"] != slots:
            raise DataStateError(
                f"the checkpoint's data position was saved by {saved['process_count']} "
                f"process(es) and this run has {slots}: rerun with {saved['process_count']}, "
                "or set --config.data.reset_position=true to keep the trained state and "
                "restart the data pipeline from its beginning"
            )
        first = jax.process_index() * len(self.local)
        for offset, it in enumerate(self.local):
            it.set_state(saved["processes"][first + offset])


def in_step(batches: Iterable[Mapping[str, np.ndarray]]) -> Iterator[dict[str, np.ndarray]]:
    """Yield host batches so that every process yields the same number of them.

    Finite pipelines (eval) give shards of unequal length, and one process stepping on
    alone would wait forever in the next collective. Each batch costs one all-gather of a
    flag; a process whose shard ran out yields all-zero batches (every mask 0: no loss,
    no count) until every shard is done."""
    import jax
    from jax.experimental import multihost_utils

    it, last = iter(batches), None
    while True:
        batch = next(it, None)
        have = np.int32(batch is not None)
        if jax.process_count() > 1:
            have = np.max(multihost_utils.process_allgather(have))
        if not have:
            return
        if batch is None:
            if last is None:
                raise DataStateError(
                    f"process {jax.process_index()}'s data shard is empty while others "
                    "have batches: use fewer processes or more data"
                )
            batch = {k: np.zeros_like(v) for k, v in last.items()}
        last = batch
        yield dict(batch)
