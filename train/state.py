"""TrainState and its sharded creation (eval_shape -> partition specs -> jit with out_shardings).

Parameters and optimizer state are plain (unboxed) arrays; their shardings come from the
logical names the modules attach at init. The RNG is raw uint32 key data so checkpoints
store it like any other array.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from flax import struct
from jax.sharding import Mesh, NamedSharding

from model import lora
from model import sharding as sh
from train.optim import key_name


class TrainState(struct.PyTreeNode):
    step: jax.Array  # int32 scalar: number of updates applied
    params: Any
    opt_state: Any
    rng: jax.Array  # uint32[2] raw key data; per-step keys are fold_in(rng, step)


def step_rng(state: TrainState) -> jax.Array:
    return jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)


def init_params_fn(model: nn.Module, example_tokens: jax.Array) -> Callable[[jax.Array], Any]:
    """rng -> boxed params (with logical axis metadata)."""

    def init(rng: jax.Array) -> Any:
        return model.init({"params": rng}, example_tokens)["params"]

    return init


def param_shardings(model: nn.Module, mesh: Mesh, rules: sh.Rules, seq_len: int = 8) -> Any:
    """NamedShardings of the model's parameters, computed without allocating them."""
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    boxed = jax.eval_shape(init_params_fn(model, tokens), jax.random.key(0))
    return sh.logical_to_sharding(nn.get_partition_spec(boxed), mesh, rules)


def abstract_sharded_params(model: nn.Module, mesh: Mesh, rules: sh.Rules) -> Any:
    """The model's parameter ShapeDtypeStructs carrying this mesh's shardings (nothing
    allocated): the target to restore or stream parameters into."""
    tokens = jnp.zeros((1, 8), jnp.int32)
    shapes = nn.unbox(jax.eval_shape(init_params_fn(model, tokens), jax.random.key(0)))
    shardings = param_shardings(model, mesh, rules)
    sh.check_divisible(shapes, shardings)
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings
    )


def opt_state_shardings(
    abstract_opt: Any, abstract_params: Any, params_sh: Any, replicated: NamedSharding
) -> Any:
    """A shardings tree for the optimizer state.

    A state leaf takes its parameter's sharding when its path ends with that parameter's
    path and it has the parameter's shape (moments, momenta); anything else is replicated
    (counts, Adafactor's factored stats). Matching by path rather than by tree structure
    lets masked states through (Muon keeps its momentum for matrices only, with
    `MaskedNode` where the other parameters would be).
    """
    by_path = {
        tuple(map(key_name, path)): (param.shape, sharding)
        for (path, param), sharding in zip(
            jax.tree_util.tree_leaves_with_path(abstract_params),
            jax.tree.leaves(params_sh, is_leaf=lambda x: isinstance(x, NamedSharding)),
            strict=True,
        )
    }

    def pick(path: tuple, leaf: Any) -> NamedSharding:
        names = tuple(map(key_name, path))
        for start in range(len(names)):
            shape, sharding = by_path.get(names[start:], (None, None))
            if sharding is not None:
                return sharding if shape == leaf.shape else replicated
        return replicated

    return jax.tree_util.tree_map_with_path(pick, abstract_opt)


def state_shardings(
    model: nn.Module, tx: optax.GradientTransformation, mesh: Mesh, rules: sh.Rules
) -> tuple[TrainState, TrainState]:
    """(abstract state, its shardings). Optimizer moments follow their parameter's sharding;
    anything not shaped like a parameter (counts, factored Adafactor stats) is replicated."""
    params_sh = param_shardings(model, mesh, rules)
    tokens = jnp.zeros((1, 8), jnp.int32)
    abstract_params = nn.unbox(jax.eval_shape(init_params_fn(model, tokens), jax.random.key(0)))
    # Optimizer state for the trainable part only (all of it without LoRA adapters).
    abstract_opt = jax.eval_shape(tx.init, lora.trainable(abstract_params))
    replicated = sh.replicated(mesh)
    opt_sh = opt_state_shardings(abstract_opt, abstract_params, params_sh, replicated)
    abstract = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32),
        params=abstract_params,
        opt_state=abstract_opt,
        rng=jax.ShapeDtypeStruct((2,), jnp.uint32),
    )
    shardings = TrainState(step=replicated, params=params_sh, opt_state=opt_sh, rng=replicated)
    sh.check_divisible(abstract, shardings)
    return abstract, shardings


def create_train_state(
    model: nn.Module, tx: optax.GradientTransformation, mesh: Mesh, rules: sh.Rules, seed: int
) -> tuple[TrainState, TrainState]:
    """Initialize the state directly into its shards (no host copy of the full model).

    Parameters come from fold_in(key(seed), 0) and the state RNG from fold_in(..., 1), so the
    same seed gives the same weights on any mesh. Returns (state, shardings).
    """
    _, shardings = state_shardings(model, tx, mesh, rules)
    tokens = jnp.zeros((1, 8), jnp.int32)

    def init(seed_key: jax.Array) -> TrainState:
        params = nn.unbox(init_params_fn(model, tokens)(jax.random.fold_in(seed_key, 0)))
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(lora.trainable(params)),
            rng=jax.random.key_data(jax.random.fold_in(seed_key, 1)),
        )

    with sh.sharding_context(mesh, rules):
        state = jax.jit(init, out_shardings=shardings)(jax.random.key(seed))
    return state, shardings
