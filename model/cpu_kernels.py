"""model/cpu_kernels.cc, compiled on first use and called from XLA through its typed FFI.

The library is built with the machine's C++ compiler (`$CXX`, else g++) for the machine it
runs on (-march=native) into `$FLAXLM_KERNEL_CACHE` (default ~/.cache/flaxlm/kernels),
named by a hash of the source and the flags, so each version compiles once per machine.
`available()` says whether that worked; callers fall back to plain XLA ops when it did not.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

SOURCE = pathlib.Path(__file__).with_name("cpu_kernels.cc")
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")
# FFI target name -> the library's handler symbol, by the layout of the codes q.
INT8_MATMUL = {"in_out": "FlaxlmInt8MatmulInOut", "out_in": "FlaxlmInt8MatmulOutIn"}
LLAMA_DECODE = "FlaxlmLlamaDecode"


class KernelBuildError(RuntimeError):
    pass


def _cache_dir() -> pathlib.Path:
    default = pathlib.Path.home() / ".cache" / "flaxlm" / "kernels"
    return pathlib.Path(os.environ.get("FLAXLM_KERNEL_CACHE", default))


def _compiler() -> str:
    name = os.environ.get("CXX", "g++")
    if shutil.which(name) is None:
        raise KernelBuildError(f"no C++ compiler: {name!r} is not on PATH (set $CXX)")
    return name


def build() -> pathlib.Path:
    """The compiled library's path, compiling it first if this source and these flags
    have not been compiled on this machine."""
    compiler = _compiler()
    source = SOURCE.read_bytes()
    tag = hashlib.sha256(source + " ".join((compiler, *FLAGS)).encode()).hexdigest()[:16]
    target = _cache_dir() / f"cpu_kernels-{tag}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Compile beside the target, then rename: concurrent first uses never see half a file.
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        partial = pathlib.Path(tmp) / target.name
        command = [compiler, *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", str(partial)]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise KernelBuildError(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
        os.replace(partial, target)
    return target


@functools.cache
def _register() -> None:
    library = ctypes.cdll.LoadLibrary(str(build()))
    for symbol in (*INT8_MATMUL.values(), LLAMA_DECODE):
        handler = jax.ffi.pycapsule(getattr(library, symbol))
        jax.ffi.register_ffi_target(symbol, handler, platform="cpu")


@functools.cache
def available() -> bool:
    """True when the kernels compiled and registered (a missing compiler makes it False)."""
    try:
        _register()
    except (KernelBuildError, OSError):
        return False
    return True


def int8_matmul(
    x: jax.Array, q: jax.Array, scale: jax.Array, low: jax.Array, layout: str
) -> jax.Array:
    """x [..., in] fp32 times W [in, out] given as uint8 codes with one scale and one
    minimum per group of g consecutive inputs, W[i, o] = code * scale + low:

    - layout "in_out": q [in, out], scale and low [in / g, out];
    - layout "out_in": q [out, in], scale and low [out, in / g] (g a multiple of 8).

    Returns [..., out] fp32. Needs `available()`; CPU only (`QuantizedWeight.project`
    picks)."""
    _register()
    width = q.shape[1] if layout == "in_out" else q.shape[0]
    out = jax.ShapeDtypeStruct((*x.shape[:-1], width), jnp.float32)
    call = jax.ffi.ffi_call(INT8_MATMUL[layout], out, vmap_method="broadcast_all")
    return call(x.astype(jnp.float32), q, scale, low)


# The stacked block weights `llama_decode` reads, in its argument order: (module, param).
LLAMA_WEIGHTS = (
    ("attn_norm", "scale"),
    ("attn", "q"),
    ("attn", "k"),
    ("attn", "v"),
    ("attn", "o"),
    ("mlp_norm", "scale"),
    ("mlp", "gate"),
    ("mlp", "up"),
    ("mlp", "down"),
)


def llama_decode(
    x: jax.Array,
    positions: jax.Array,
    slot: jax.Array,
    segment_ids: jax.Array,
    params: dict,
    cache: dict,
    *,
    eps: float,
    theta: float,
    tied_head: bool,
) -> tuple[jax.Array, dict]:
    """One token [B, D] (embedded) through every block, the final norm and the LM head of
    a plain Llama stack, in one call.

    positions [B]: RoPE positions; slot: the cache slot written (a scalar); segment_ids
    [B, S]: the cache's, with 1 already written at `slot` (a decode query is segment 1
    and attends the segment-1 slots up to its own); params: the model's, fp32 (the
    scanned `layers`, each of `LLAMA_WEIGHTS` stacked [L, ...], `final_norm`, and the
    `embedding` [V, D] when `tied_head`, else `lm_head` [D, V]); cache: k, v [L, B, K, S, H]
    fp32, updated in place. Returns (logits [B, V] fp32, the cache with the new k, v).
    Needs `available()`; CPU only."""
    _register()
    weights = [params["layers"][module][name] for module, name in LLAMA_WEIGHTS]
    head = params["embedding"] if tied_head else params["lm_head"]
    vocab = head.shape[0] if tied_head else head.shape[1]
    outs = (
        jax.ShapeDtypeStruct((x.shape[0], vocab), jnp.float32),
        jax.ShapeDtypeStruct(cache["k"].shape, jnp.float32),
        jax.ShapeDtypeStruct(cache["v"].shape, jnp.float32),
    )
    call = jax.ffi.ffi_call(LLAMA_DECODE, outs, input_output_aliases={13: 1, 14: 2})
    logits, k, v = call(
        x,
        positions.astype(jnp.int32),
        jnp.asarray(slot, jnp.int32),
        segment_ids.astype(jnp.int32),
        *weights,
        cache["k"],
        cache["v"],
        params["final_norm"]["scale"],
        head,
        eps=np.float32(eps),
        theta=np.float32(theta),
        tied_head=np.int32(tied_head),
    )
    return logits, {**cache, "k": k, "v": v}
