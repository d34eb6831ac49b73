"""Run a CPU host as one XLA device per core, for data-parallel training.

On a small model every matmul is small, and splitting each one over the cores (XLA's
default, one device using them all) wastes much of the machine on synchronisation. Giving
each core its own device, running its share of the batch, and averaging the gradients (a
`mesh.data` axis over the devices) is faster: on the 2-core benchmark shape, 13,043
against 7,840 tokens/s (medians of 3 runs, docs/benchmarks.md). The devices share one
thread per core, so a lone large matmul on one device still uses every core. XLA reads
these flags when its CPU backend starts, so this must run before anything touches a JAX
device.
"""

from __future__ import annotations

import os

# Eigen's multi-threading off; matmuls to Eigen rather than YNNPACK, whose own thread pool
# would again spread each device's matmul over every core. Measured, they add 4-6 % to two
# devices' throughput (docs/benchmarks.md, "One all-reduce a step").
DEVICE_FLAGS = (
    "--xla_cpu_multi_thread_eigen=false",
    "--xla_cpu_experimental_ynn_fusion_type=",
)


def cores_as_devices(n: int) -> None:
    """Ask XLA for `n` host devices with the flags above; raises if the backend already started."""
    if n < 1:
        raise ValueError(f"cores as devices: {n} must be at least 1")
    from jax._src import xla_bridge  # no public way to ask whether the backend started

    if xla_bridge.backends_are_initialized():
        raise RuntimeError("cores as devices: JAX's backend already started; ask before using it")
    flags = os.environ.get("XLA_FLAGS", "").split()
    flags = [f for f in flags if not f.startswith("--xla_force_host_platform_device_count")]
    flags += [f"--xla_force_host_platform_device_count={n}", *DEVICE_FLAGS]
    os.environ["XLA_FLAGS"] = " ".join(flags)
    import jax

    if jax.default_backend() != "cpu":
        raise RuntimeError(f"cores as devices: the backend is {jax.default_backend()}, not cpu")


def take_cores_as_devices_flag(argv: list[str]) -> list[str]:
    """Strip `--cores-as-devices N` (or `--cores-as-devices=N`) from argv and, when given, run
    `cores_as_devices(N)`; return the rest. The `flaxlm` command calls this before anything
    starts JAX. Raises ValueError naming the flag for a missing or non-positive N."""
    rest, count = [], None
    args = iter(argv)
    for arg in args:
        if arg == "--cores-as-devices" or arg.startswith("--cores-as-devices="):
            value = arg.partition("=")[2] if "=" in arg else next(args, "")
            if not value.isdigit() or int(value) < 1:
                raise ValueError(f"--cores-as-devices {value!r}: must be a positive integer")
            count = int(value)
        else:
            rest.append(arg)
    if count is not None:
        cores_as_devices(count)
    return rest


def sync_every_step() -> bool:
    """Whether a training loop must wait for each step before dispatching the next.

    With several in-process CPU devices, XLA's collectives can hang when many steps are
    queued: an all-reduce waits for a device that never joins, and after 40 s XLA aborts
    the process. Measured on jax 0.10.2 with a bare two-device psum dispatched 100 times:
    4 of 6 runs hung queued, 0 of 6 waiting for each call. Turning off JAX's async CPU
    dispatch (`jax_cpu_enable_async_dispatch`) does not prevent it: 3 of 4 runs hung.
    Waiting costs the overlap of Python's dispatch with the step, well under a millisecond
    here.
    """
    import jax

    return jax.default_backend() == "cpu" and jax.local_device_count() > 1
