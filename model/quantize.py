"""int8 weight-only decoding: each kernel stored as uint8 codes with a scale and a minimum
per 32 inputs, multiplied by an FFI kernel on the CPU (model/cpu_kernels.py).

    params8 = quantize_params(params)            # once, on the host
    generate(model, params8, ...)                # the same model, the same call

A group of 32 consecutive inputs of one output gets 256 levels, from its minimum to its
maximum or symmetric about 0, whichever reproduces it better: weights dequantized from
GGUF's Q4_1 blocks land on the first (or within 1/255 of a level), Q8_0's on the second.
Embeddings are read back one row at a time; norms, biases and the scalar head stay fp32.
The quantized weight is a pytree (`QuantizedWeight`) that takes the kernel's place in the
params, so `layers.project` sees it and calls the kernel; off the CPU, or where the kernel
could not be compiled, it dequantizes and uses XLA's dot instead. Decoding only: there is
no gradient.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from model import cpu_kernels

GROUP = 32
LEVELS = 255
# The input (contracted) axes of each kernel, per layer, as model/layers.py and
# model/transformer.py contract them: q/k/v "DNH", o "NHD", up/gate "DF", down "FD",
# lm_head "DV", and the embedding "VD" read as the tied head (D is its input).
KERNEL_INPUT_AXES: dict[str, tuple[int, ...]] = {
    "q": (0,),
    "k": (0,),
    "v": (0,),
    "o": (0, 1),
    "up": (0,),
    "gate": (0,),
    "down": (0,),
    "lm_head": (0,),
    "embedding": (1,),
}
# The scanned blocks' params carry a leading layer axis under this module name.
SCANNED = "layers"


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """A kernel of shape `shape` whose `in_axes` are contracted, as uint8 codes q with a
    scale and a minimum per group of inputs: W = code * scale + low.

    Read as a matrix over in = prod(shape[in_axes]) and out = the other axes' product,
    the codes are [in, out] (`layout` "in_out": q has the kernel's own shape and order,
    the input axes first; scale and low [in / group, out]) or [out, in] ("out_in": the
    embedding [V, D] with D its input; scale and low [out, in / group]). Leading axes of
    the arrays, if any, are stacked layers. Keeping q in the kernel's shape lets it stand
    where the fp32 kernel stood in the params (Flax checks a param's shape on use).
    """

    q: jax.Array
    scale: jax.Array
    low: jax.Array
    shape: tuple[int, ...] = dataclasses.field(metadata={"static": True})
    in_axes: tuple[int, ...] = dataclasses.field(metadata={"static": True})
    layout: str = dataclasses.field(metadata={"static": True})

    @property
    def widths(self) -> tuple[int, int]:
        """(in, out) of the kernel read as a matrix."""
        width = math.prod(self.shape[a] for a in self.in_axes)
        return width, math.prod(self.shape) // width

    def astype(self, dtype: Any) -> QuantizedWeight:
        del dtype  # the codes are the weight; the kernel computes in fp32
        return self

    @property
    def T(self) -> QuantizedWeight:  # noqa: N802 (the array attribute it stands in for)
        """The transposed kernel (the tied head from the embedding): same codes, the
        axes reversed."""
        rank = len(self.shape)
        return dataclasses.replace(
            self,
            shape=self.shape[::-1],
            in_axes=tuple(sorted(rank - 1 - a for a in self.in_axes)),
        )

    def matrix(self) -> jax.Array:
        """The fp32 kernel as [..., in, out] (leading axes: stacked layers)."""
        lead = self.q.shape[: self.q.ndim - len(self.shape)]
        width, out = self.widths
        if self.layout == "in_out":
            codes = self.q.reshape(*lead, -1, width // self.scale.shape[-2], out)
            w = codes.astype(jnp.float32) * self.scale[..., None, :] + self.low[..., None, :]
            return w.reshape(*lead, width, out)
        codes = self.q.reshape(*lead, out, -1, width // self.scale.shape[-1])
        w = codes.astype(jnp.float32) * self.scale[..., None] + self.low[..., None]
        return jnp.swapaxes(w.reshape(*lead, out, width), -1, -2)

    def dequantize(self) -> jax.Array:
        """The fp32 kernel: [..., *shape], stacked layers first."""
        w = self.matrix()
        lead = w.shape[:-2]
        free = [a for a in range(len(self.shape)) if a not in self.in_axes]
        moved = w.reshape(*lead, *(self.shape[a] for a in (*self.in_axes, *free)))
        order = np.argsort((*self.in_axes, *free)) + len(lead)
        return jnp.transpose(moved, (*range(len(lead)), *order))

    def take(self, ids: jax.Array) -> jax.Array:
        """Rows of an embedding table ("out_in", [rows, width]), dequantized."""
        if self.layout != "out_in" or len(self.shape) != 2 or self.in_axes != (1,):
            raise ValueError(f"take: only rows of an embedding table, not {self}")
        codes = self.q[ids].astype(jnp.float32)
        rows = codes.reshape(*codes.shape[:-1], self.scale.shape[-1], -1)
        return (rows * self.scale[ids][..., None] + self.low[ids][..., None]).reshape(codes.shape)

    def project(self, spec: str, x: jax.Array, out_dtype: Any = None) -> jax.Array:
        """jnp.einsum(spec, x, W) where x's contracted axes come last, in W's order, and
        the output is x's other axes then W's free axes (every projection of the model)."""
        x_axes, rest = spec.split(",")
        w_axes, out_axes = rest.split("->")
        contracted = "".join(a for a in w_axes if a in x_axes)
        kept = x_axes[: len(x_axes) - len(contracted)]
        free = "".join(a for a in w_axes if a not in x_axes)
        in_axes = tuple(w_axes.index(a) for a in contracted)
        if in_axes != self.in_axes or not x_axes.endswith(contracted) or out_axes != kept + free:
            raise ValueError(f"int8 project: spec {spec!r} does not match {self}")
        flat = x.reshape(*x.shape[: len(kept)], -1)
        y = _matmul(flat, self)
        out = y.reshape(*x.shape[: len(kept)], *(self.shape[w_axes.index(a)] for a in free))
        return out.astype(out_dtype or x.dtype)

    def __repr__(self) -> str:
        return f"QuantizedWeight(shape={self.shape}, in_axes={self.in_axes}, {self.layout})"


def _matmul(x: jax.Array, w: QuantizedWeight) -> jax.Array:
    """x [..., in] @ W [in, out] -> fp32: the FFI kernel on the CPU, XLA's dot elsewhere."""

    def with_xla(x):
        return jnp.einsum("...i,io->...o", x.astype(jnp.float32), w.matrix())

    if not cpu_kernels.available():
        return with_xla(x)

    def with_kernel(x):
        width, out = w.widths
        q = w.q.reshape((width, out) if w.layout == "in_out" else (out, width))
        return cpu_kernels.int8_matmul(x, q, w.scale, w.low, w.layout)

    return jax.lax.platform_dependent(x, cpu=with_kernel, default=with_xla)


def quantize(w: np.ndarray, in_axes: tuple[int, ...], stacked: int = 0) -> QuantizedWeight:
    """W (with `stacked` leading layer axes) -> codes, scales and minimums per GROUP
    inputs (per whole input row when its width is not a multiple of GROUP). The input
    axes must lead ("in_out") or trail ("out_in") the kernel's axes."""
    w = np.asarray(w, np.float32)
    lead, shape = w.shape[:stacked], w.shape[stacked:]
    rank, n = len(shape), len(in_axes)
    if tuple(in_axes) == tuple(range(n)):
        layout = "in_out"
    elif tuple(in_axes) == tuple(range(rank - n, rank)):
        layout = "out_in"
    else:
        raise ValueError(f"quantize: input axes {in_axes} neither lead nor trail {shape}")
    width = math.prod(shape[a] for a in in_axes)
    group = GROUP if width % GROUP == 0 else width
    if layout == "in_out":  # blocks [..., groups, group, out], reduced over the group
        blocks, axis = w.reshape(*lead, width // group, group, -1), -2
    else:  # blocks [..., out, groups, group]
        blocks, axis = w.reshape(*lead, -1, width // group, group), -1
    # Two grids per group, the one that reproduces it better kept: 256 levels from its
    # minimum to its maximum (exact for GGUF's Q4_1 blocks), or 255 levels symmetric about
    # 0 (exact for Q8_0's, whose largest code is always +-127).
    spread = _grid(blocks, axis, blocks.min(axis), blocks.max(axis))
    absmax = np.abs(blocks).max(axis)
    symmetric = _grid(blocks, axis, -absmax * 128 / 127, absmax)
    better = symmetric[3] < spread[3]
    codes = np.where(np.expand_dims(better, axis), symmetric[0], spread[0])
    scale = np.where(better, symmetric[1], spread[1])
    low = np.where(better, symmetric[2], spread[2])
    return QuantizedWeight(
        jnp.asarray(codes.reshape(w.shape)),
        jnp.asarray(scale),
        jnp.asarray(low),
        tuple(shape),
        tuple(in_axes),
        layout,
    )


def _grid(blocks: np.ndarray, axis: int, low: np.ndarray, high: np.ndarray) -> tuple:
    """Codes, scale, low and the largest error per group for LEVELS steps from low up."""
    scale = (high - low) / LEVELS
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)  # a constant group: codes 0
    low = low.astype(np.float32)
    codes = np.rint((blocks - np.expand_dims(low, axis)) / np.expand_dims(scale, axis))
    codes = np.clip(codes, 0, LEVELS).astype(np.uint8)
    back = codes * np.expand_dims(scale, axis) + np.expand_dims(low, axis)
    return codes, scale, low, np.abs(back - blocks).max(axis)


def quantize_params(params: Mapping) -> dict:
    """The model's params with every projection kernel (KERNEL_INPUT_AXES) quantized;
    other leaves are returned as they are. An embedding whose width is not a multiple
    of 8 (the kernel's vector width) stays fp32."""

    def walk(tree: Mapping, path: tuple[str, ...]) -> dict:
        out = {}
        for name, value in tree.items():
            if isinstance(value, Mapping):
                out[name] = walk(value, (*path, name))
                continue
            stacked = int(SCANNED in path)
            axes = KERNEL_INPUT_AXES.get(name)
            width = 0  # 0: not a kernel
            if axes is not None and np.ndim(value) - stacked >= max(2, max(axes) + 1):
                width = math.prod(np.shape(value)[stacked + a] for a in axes)
            fits = width and (axes[0] == 0 or width % 8 == 0)  # "out_in" reads 8 at a time
            out[name] = quantize(value, axes, stacked) if fits else value
        return out

    return walk(params, ())


def dequantize_params(params: Mapping) -> dict:
    """quantize_params undone: every QuantizedWeight back to an fp32 array (its grid's
    values, not the original weights)."""
    return jax.tree.map(
        lambda leaf: leaf.dequantize() if isinstance(leaf, QuantizedWeight) else leaf,
        dict(params),
        is_leaf=lambda leaf: isinstance(leaf, QuantizedWeight),
    )
