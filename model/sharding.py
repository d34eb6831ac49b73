"""Logical axis names, the rule tables that map them onto the mesh, and mesh creation.

Every logical axis name used by the model is defined here and nowhere else. A rule table
is plain data keyed by strategy; within a table, rule order is precedence (flax takes the
first rule whose mesh axis is still free). The mesh always has the axes
(`data`, `fsdp`, `tensor`); an axis of size 1 costs nothing, so every strategy runs on
every mesh shape.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np
from flax import linen as nn
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Parameter axes.
VOCAB = "vocab"
EMBED = "embed"
MLP = "mlp"
HEADS = "heads"
KV_HEADS = "kv_heads"
HEAD_DIM = "head_dim"
NORM = "norm"
POSITION = "position"  # rows of the learned position table: no rule, so replicated
LAYERS = "layers"
# Activation axes.
ACT_BATCH = "activation_batch"
ACT_LENGTH = "activation_length"
ACT_EMBED = "activation_embed"
ACT_HEADS = "activation_heads"
ACT_KV_HEADS = "activation_kv_heads"
ACT_MLP = "activation_mlp"
ACT_VOCAB = "activation_vocab"
CACHE_LENGTH = "cache_length"

Rules = tuple[tuple[str, Any], ...]

_BATCH = ((ACT_BATCH, ("data", "fsdp")),)
_TENSOR = (
    (HEADS, "tensor"),
    (KV_HEADS, "tensor"),
    (MLP, "tensor"),
    (VOCAB, "tensor"),
    (ACT_HEADS, "tensor"),
    (ACT_KV_HEADS, "tensor"),
    (ACT_MLP, "tensor"),
    (ACT_VOCAB, "tensor"),
)
_FSDP = ((EMBED, "fsdp"),)

RULES: dict[str, Rules] = {
    "dp": _BATCH,  # parameters replicated, batch split over data (and fsdp if > 1)
    "fsdp": _BATCH + _FSDP,  # parameters and optimizer state split along embed (ZeRO-3)
    "tp": _BATCH + _TENSOR,  # Megatron-style: heads, mlp and vocab split over tensor
    "fsdp_tp": _BATCH + _TENSOR + _FSDP,
}


def get_rules(strategy: str) -> Rules:
    if strategy not in RULES:
        raise ValueError(f"mesh.strategy={strategy!r}: unknown; choose from {sorted(RULES)}")
    return RULES[strategy]


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Replace a single -1 by the remaining devices; check the product is the device count."""
    shape = tuple(int(s) for s in shape)
    named = ", ".join(f"mesh.{n}={s}" for n, s in zip(MESH_AXES, shape, strict=True))
    if shape.count(-1) > 1:
        raise ValueError(f"mesh: at most one axis may be -1 ({named})")
    if any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"mesh: axis sizes must be positive or -1 ({named})")
    known = math.prod(s for s in shape if s != -1)
    if num_devices % known:
        raise ValueError(f"mesh: {named} does not divide the {num_devices} devices")
    if -1 in shape:
        shape = tuple(num_devices // known if s == -1 else s for s in shape)
    elif known != num_devices:
        raise ValueError(f"mesh: {named} uses {known} devices but {num_devices} are present")
    return shape


def make_mesh(
    data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """Mesh with axes (data, fsdp, tensor); -1 means 'all remaining devices'."""
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape((data, fsdp, tensor), len(devices))
    if len(devices) == len(jax.devices()):
        device_array = mesh_utils.create_device_mesh(shape, devices)
    else:  # a subset (tests): keep the given order
        device_array = np.asarray(devices).reshape(shape)
    return Mesh(device_array, MESH_AXES)


@contextlib.contextmanager
def sharding_context(mesh: Mesh, rules: Rules) -> Iterator[None]:
    """Mesh and logical rules active while tracing, so activation constraints resolve."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


def logical_to_sharding(logical_specs: Any, mesh: Mesh, rules: Rules) -> Any:
    """A pytree of logical PartitionSpecs -> a pytree of NamedShardings."""
    return nn.logical_to_mesh_sharding(logical_specs, mesh, rules)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, rules: Rules, ndim: int = 2) -> NamedSharding:
    """Sharding of a [batch, ...] input array: batch split by the ACT_BATCH rule."""
    spec = nn.logical_to_mesh_axes((ACT_BATCH,) + (None,) * (ndim - 1), rules)
    return NamedSharding(mesh, spec)


def batch_split(mesh: Mesh, rules: Rules) -> int:
    """How many ways the batch axis of an input is split (the devices holding distinct rows)."""
    axes = batch_sharding(mesh, rules, 1).spec[0]
    axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
    return int(np.prod([mesh.shape[a] for a in axes]))


def check_divisible(abstract_tree: Any, shardings: Any) -> None:
    """Raise a clear error naming the array whose dimension the mesh cannot split evenly."""
    flat_shapes = jax.tree_util.tree_flatten_with_path(abstract_tree)[0]
    flat_shardings = jax.tree_util.tree_leaves(
        shardings, is_leaf=lambda x: isinstance(x, NamedSharding)
    )
    for (path, leaf), sharding in zip(flat_shapes, flat_shardings, strict=True):
        for dim, axes in zip(leaf.shape, sharding.spec, strict=False):
            if axes is None:
                continue
            axes = (axes,) if isinstance(axes, str) else axes
            parts = math.prod(sharding.mesh.shape[a] for a in axes)
            if dim % parts:
                raise ValueError(
                    f"{jax.tree_util.keystr(path)} has shape {leaf.shape}: dimension {dim} "
                    f"cannot be split over mesh axes {axes} of total size {parts}"
                )
