"""The one optimizer factory: AdamW / Lion / Adafactor / Muon, LR schedules, clipping, decay
mask, and gradient accumulation over microbatches.

Weight decay applies to matrices (kernels, embeddings) and never to norm scales or biases;
the mask goes by parameter name because scanned layers make norm scales 2-D.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from jax.flatten_util import ravel_pytree
from jax.sharding import PartitionSpec

from model import lora

OPTIMIZERS = ("adamw", "lion", "adafactor", "muon")
SCHEDULES = ("cosine", "linear", "constant", "wsd")
NO_DECAY_NAMES = ("scale", "bias", "scalar_bias")


def make_schedule(
    schedule: str,
    lr: float,
    total_steps: int,
    warmup_steps: int = 0,
    min_lr_ratio: float = 0.1,
    decay_fraction: float = 0.2,
) -> optax.Schedule:
    """Linear warmup to `lr`, then:
    cosine: cosine decay to min_lr_ratio * lr at total_steps;
    linear: linear decay to min_lr_ratio * lr at total_steps;
    constant: stay at lr;
    wsd: warmup-stable-decay, stay at lr, then decay linearly to min_lr_ratio * lr over
         the last `decay_fraction` of training.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"optim.schedule={schedule!r}: unknown; choose from {SCHEDULES}")
    if lr <= 0:
        raise ValueError(f"optim.lr={lr}: must be positive")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"optim.warmup_steps={warmup_steps}: must be in [0, total_steps]")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"optim.min_lr_ratio={min_lr_ratio}: must be in [0, 1]")
    end_lr = lr * min_lr_ratio
    rest = max(total_steps - warmup_steps, 1)
    if schedule == "cosine":
        after = optax.cosine_decay_schedule(lr, rest, alpha=min_lr_ratio)
    elif schedule == "linear":
        after = optax.linear_schedule(lr, end_lr, rest)
    elif schedule == "constant":
        after = optax.constant_schedule(lr)
    else:
        if not 0.0 < decay_fraction <= 1.0:
            raise ValueError(f"optim.decay_fraction={decay_fraction}: must be in (0, 1]")
        decay = max(round(decay_fraction * total_steps), 1)
        stable = max(rest - decay, 0)
        after = optax.join_schedules(
            [optax.constant_schedule(lr), optax.linear_schedule(lr, end_lr, decay)], [stable]
        )
    if warmup_steps == 0:
        return after
    warmup = optax.linear_schedule(lr / warmup_steps, lr, warmup_steps - 1)
    return optax.join_schedules([warmup, after], [warmup_steps])


def key_name(key: Any) -> str:
    """A pytree path entry's name: a dict key, an attribute name or a sequence index."""
    return str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key))))


def decay_mask(params: Any) -> Any:
    """True for parameters that get weight decay (matrices), False for norms and biases."""

    def keep(path: tuple, _: Any) -> bool:
        return key_name(path[-1]) not in NO_DECAY_NAMES

    return jax.tree_util.tree_map_with_path(keep, params)


# Muon's matrices, by parameter name: (reduction axes, output axes) counted from the last
# axis, so a leading layer axis (scanned layers) is a batch axis orthogonalized per layer.
MUON_AXES = {
    "q": ((-3,), (-2, -1)),  # [D, heads, head_dim]
    "k": ((-3,), (-2, -1)),
    "v": ((-3,), (-2, -1)),
    "o": ((-3, -2), (-1,)),  # [heads, head_dim, D]
    "gate": ((-2,), (-1,)),  # [D, F]
    "up": ((-2,), (-1,)),
    "down": ((-2,), (-1,)),  # [F, D]
}


def muon_dimension_numbers(params: Any) -> Any:
    """Muon orthogonalizes the attention and MLP matrices; the embedding, the LM and scalar
    heads and the norm scales (None) go to its AdamW."""

    def spec(path: tuple, param: Any) -> Any:
        axes = MUON_AXES.get(key_name(path[-1]))
        if axes is None:
            return None
        reduction, output = (tuple(param.ndim + a for a in group) for group in axes)
        return optax.contrib.MuonDimensionNumbers(reduction, output)

    return jax.tree_util.tree_map_with_path(spec, params)


def make_optimizer(
    name: str = "adamw",
    lr: float = 3e-4,
    schedule: str = "cosine",
    total_steps: int = 1000,
    warmup_steps: int = 0,
    min_lr_ratio: float = 0.1,
    decay_fraction: float = 0.2,
    weight_decay: float = 0.1,
    b1: float = 0.9,
    b2: float = 0.95,
    eps: float = 1e-8,
    clip_norm: float = 1.0,
    ns_steps: int = 5,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Build (optimizer, lr schedule). clip_norm <= 0 disables global-norm clipping;
    ns_steps is Muon's number of Newton-Schulz iterations (ignored by the others)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optim.name={name!r}: unknown; choose from {OPTIMIZERS}")
    if weight_decay < 0:
        raise ValueError(f"optim.weight_decay={weight_decay}: must be >= 0")
    if ns_steps < 1:
        raise ValueError(f"optim.ns_steps={ns_steps}: must be >= 1")
    lr_fn = make_schedule(schedule, lr, total_steps, warmup_steps, min_lr_ratio, decay_fraction)
    if name == "adamw":
        core = optax.adamw(lr_fn, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask)
    elif name == "lion":
        core = optax.lion(lr_fn, b1=b1, b2=b2, weight_decay=weight_decay, mask=decay_mask)
    elif name == "muon":
        # consistent_rms 0.2 scales each orthogonalized update to AdamW's typical RMS, so one
        # `optim.lr` (and schedule) serves the Muon matrices and the AdamW rest alike.
        # Weight decay applies to the Muon matrices; the AdamW rest (embedding, norms) has none.
        core = optax.contrib.muon(
            lr_fn,
            beta=b1,
            weight_decay=weight_decay,
            adam_b1=b1,
            adam_b2=b2,
            eps=eps,
            muon_weight_dimension_numbers=muon_dimension_numbers,
            consistent_rms=0.2,
            ns_steps=ns_steps,
        )
    else:
        core = optax.adafactor(
            lr_fn,
            weight_decay_rate=weight_decay or None,
            weight_decay_mask=decay_mask,
            multiply_by_parameter_scale=False,
        )
    parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm > 0 else []
    return optax.chain(*parts, core), lr_fn


def optimizer_from_config(config: Any) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(optimizer, lr schedule) from a stage config's `optim` section and `total_steps`."""
    o = config.optim
    return make_optimizer(
        o.name, o.lr, o.schedule, config.total_steps, o.warmup_steps, o.min_lr_ratio,
        o.decay_fraction, o.weight_decay, o.b1, o.b2, o.eps, o.clip_norm, o.ns_steps,
    )  # fmt: skip


def trainable_value_and_grad(
    fn: Callable, argnums: int | tuple[int, ...] = 0, has_aux: bool = False
) -> Callable:
    """jax.value_and_grad of `fn` w.r.t. the trainable part (model/lora.py `trainable`) of
    its parameter arguments: with LoRA the adapters and scalar head only, so no gradient
    of the frozen base is ever formed; without LoRA exactly jax.value_and_grad."""
    nums = (argnums,) if isinstance(argnums, int) else tuple(argnums)
    plain = jax.value_and_grad(fn, argnums=argnums, has_aux=has_aux)

    def wrapped(*args: Any) -> Any:
        if not any(lora.is_lora(args[i]) for i in nums):
            return plain(*args)

        def inner(*parts: Any) -> Any:
            full = list(args)
            for i, part in zip(nums, parts, strict=True):
                full[i] = lora.combine(part, args[i])
            return fn(*full)

        parts = [lora.trainable(args[i]) for i in nums]
        grad = jax.value_and_grad(inner, argnums=tuple(range(len(nums))), has_aux=has_aux)
        out, grads = grad(*parts)
        return out, grads[0] if isinstance(argnums, int) else grads

    return wrapped


def apply_gradients(
    tx: optax.GradientTransformation, params: Any, opt_state: Any, grads: Any
) -> tuple[Any, Any]:
    """(new params, new opt_state): one optimizer update of the trainable part of `params`
    (grads from `trainable_value_and_grad`); frozen parameters pass through untouched."""
    part = lora.trainable(params)
    updates, opt_state = tx.update(grads, opt_state, part)
    return lora.combine(optax.apply_updates(part, updates), params), opt_state


GradFn = Callable[[Any, Any, jax.Array], tuple[tuple[jax.Array, Any], Any]]


def accumulate_gradients(
    grad_fn: GradFn, params: Any, batch: Any, rng: jax.Array, num_microbatches: int
) -> tuple[jax.Array, Any, Any]:
    """Sum `grad_fn` over microbatches of `batch` (split on the leading axis) with lax.scan.

    grad_fn(params, microbatch, rng) -> ((summed loss, aux), grads of the summed loss).
    Returns (summed loss, summed aux, summed grads): the caller divides by the total token
    count, so the result equals one pass over the whole batch however the tokens fall.
    Traced on a CPU mesh that only splits the batch, each data shard sums its own rows
    and one all-reduce adds the shards' sums (`_one_all_reduce_per_step`).
    """
    width, rows = _cpu_data_parallel_width(), jax.tree.leaves(batch)[0].shape[0]
    if width > 1 and (rows // width) % num_microbatches == 0:
        return _one_all_reduce_per_step(grad_fn, params, batch, rng, num_microbatches)
    return _summed_over_microbatches(grad_fn, params, batch, rng, num_microbatches)


def _cpu_data_parallel_width() -> int:
    """The size of the traced mesh's `data` axis when the mesh is on CPU and splits nothing
    else (fsdp = tensor = 1, so the parameters are replicated); else 1."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or jax.default_backend() != "cpu":
        return 1
    shape = dict(mesh.shape)
    if shape.get("fsdp", 1) != 1 or shape.get("tensor", 1) != 1:
        return 1
    return shape.get("data", 1)


def _one_all_reduce_per_step(
    grad_fn: GradFn, params: Any, batch: Any, rng: jax.Array, num_microbatches: int
) -> tuple[jax.Array, Any, Any]:
    """`accumulate_gradients` with each data shard summing its rows in shard_map, then one
    psum of the loss, aux and every gradient raveled into a single buffer.

    XLA:CPU's SPMD version all-reduces a scalar inside the forward pass (a point where
    every device waits for the slowest) and then the gradients as one tuple that its
    runtime reduces buffer by buffer. On the benchmark model with two devices, one buffer
    made the step 0.865x and 0.881x as long in two comparisons (docs/benchmarks.md).
    Dropout masks are drawn per shard (the rng folded with the shard index), so they depend
    on the data-parallel width.
    """

    def shard_sums(params: Any, rows: Any, rng: jax.Array) -> tuple[jax.Array, Any, Any]:
        rng = jax.random.fold_in(rng, jax.lax.axis_index("data"))
        with nn.logical_axis_rules(()):  # inside shard_map every array is the shard's own
            sums = _summed_over_microbatches(grad_fn, params, rows, rng, num_microbatches)
        flat, unravel = ravel_pytree(sums)
        return unravel(jax.lax.psum(flat, "data"))

    replicated, split_rows = PartitionSpec(), PartitionSpec("data")
    # check_vma off: model/layers.py:project's custom backward returns a replicated
    # weight's gradient as per-shard (it is, until the psum), which the check rejects.
    return jax.shard_map(
        shard_sums,
        in_specs=(replicated, split_rows, replicated),
        out_specs=replicated,
        check_vma=False,
    )(params, batch, rng)


def _summed_over_microbatches(
    grad_fn: GradFn, params: Any, batch: Any, rng: jax.Array, num_microbatches: int
) -> tuple[jax.Array, Any, Any]:
    if num_microbatches == 1:
        (loss, aux), grads = grad_fn(params, batch, rng)
        return loss, aux, grads
    batch_size = jax.tree.leaves(batch)[0].shape[0]
    if batch_size % num_microbatches:
        raise ValueError(
            f"batch_size={batch_size} is not divisible by grad_accum_steps={num_microbatches}"
        )
    # Strided split (row r goes to microbatch r % M) so every data shard feeds every
    # microbatch and no resharding is needed.
    micro = jax.tree.map(
        lambda x: x.reshape(
            batch_size // num_microbatches, num_microbatches, *x.shape[1:]
        ).swapaxes(0, 1),
        batch,
    )

    def body(carry: Any, inputs: Any) -> tuple[Any, None]:
        index, microbatch = inputs
        (loss, aux), grads = grad_fn(params, microbatch, jax.random.fold_in(rng, index))
        return jax.tree.map(jnp.add, carry, (loss, aux, grads)), None

    first_shapes = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micro), rng)
    (loss_shape, aux_shape), grad_shape = first_shapes
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (loss_shape, aux_shape, grad_shape))
    (loss, aux, grads), _ = jax.lax.scan(body, zeros, (jnp.arange(num_microbatches), micro))
    return loss, aux, grads
