"""LoRA: low-rank adapters on the attention and MLP projections, for every training stage.

Config (`model.lora.*`, every stage; configs/base.py): `rank` (0 = off, the default: the
model, its parameters and every step are exactly those without LoRA), `alpha` (the
update is scaled by alpha / rank) and `targets`, the comma-separated projection names
among q, k, v, o, gate, up, down (all of them by default).

Decisions:
- Functional, no change to the model: `wrap(Transformer(cfg), lora)` returns a `LoraModel`
  with the Transformer's `init`/`apply`. Its parameters are the Transformer's plus one
  top-level subtree `params["lora"]` mirroring the adapted kernels' paths, each
  `{"a": A, "b": B}`. A kernel W of shape [*lead, *in, *out] (lead = [L] for nn.scan's
  stacked layers; in/out as in the kernel's einsum: q/k/v [D | N, H], o [N, H | D],
  gate/up [D | F], down [F | D]) gets A [*lead, *in, r] (normal, std in**-0.5, the
  kernel's own init scale) and B [*lead, r, *out] (zeros, so step 0 is the base model
  exactly). `apply` runs the Transformer on the base tree and hands it the adapters, B
  scaled by alpha/r, as the variable collection `ADAPTERS` (model/layers.py): each adapted
  projection computes x W + (x A) B; a tree without `lora` (a frozen reference, a loaded
  parent) runs as it is.
- A and B carry the kernel's logical axis names (the rank axis unnamed: replicated), so
  they shard by the same rules table as the kernel.
- What trains (`trainable`): `lora` plus the scalar head (`scalar_head`, `scalar_bias`)
  of reward and value models, which starts fresh and has no adapter. Everything else is
  frozen: train/optim.py `trainable_value_and_grad` differentiates w.r.t. the trainable
  part only, and the optimizer state is built for it alone (train/state.py), so optimizer
  memory is proportional to the adapters. Without a `lora` subtree every parameter is
  trainable, as before.
- Why x A B and not a merged W + A B (how this module first ran): the merged form's
  backward pass forms the full gradient of every adapted kernel, 2 FLOPs per weight and
  token, only to contract it into dA and dB, and holds a merged copy of the adapted
  weights for the step. With the low-rank path the frozen kernels get no weight gradient
  (XLA drops the unused one); the extra cost is 6 FLOPs per adapter weight and token.
  Measured in benchmarks/lora_memory.py and docs/benchmarks.md. Sampling still merges,
  once per `generate` call before its decode loop (`merged`): a decode step then costs
  what the base model's does. Exports and later stages read merged weights.
- Checkpoints hold base + adapters (the whole TrainState, resumable bitwise); the meta
  records `lora` (rank, alpha, targets). Reading a LoRA checkpoint's parameters into
  anything else (train/parent.py `load_params`: `init_from` of a later stage,
  reference and reward models, `flaxlm sample/chat`, `export-hf`) merges the adapters
  into the base first; a later LoRA stage then starts fresh adapters on the merged base.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import traverse_util

from model.layers import ADAPTERS

LORA_KEY = "lora"
# Parameters trained in full even under LoRA: the scalar head of reward/value models.
FULL_KEYS = ("scalar_head", "scalar_bias")
# Projection name -> (input axes, output axes) of its kernel, after any layer axis.
TARGET_AXES = {
    "q": (1, 2),  # [D, N, H]
    "k": (1, 2),
    "v": (1, 2),
    "o": (2, 1),  # [N, H, D]
    "gate": (1, 1),  # [D, F]
    "up": (1, 1),
    "down": (1, 1),  # [F, D]
}
DEFAULT_TARGETS = ",".join(TARGET_AXES)
_ADAPTER_SALT = 0x4C6F5241  # folded into the init key: the base draws stay those without LoRA


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """rank 0 = off; scale = alpha / rank; targets: projection names (TARGET_AXES)."""

    rank: int = 0
    alpha: float = 16.0
    targets: tuple[str, ...] = tuple(TARGET_AXES)

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 0:
            raise ValueError(f"model.lora.rank={self.rank!r}: must be an integer >= 0 (0 = off)")
        alpha = self.alpha
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
            raise ValueError(f"model.lora.alpha={alpha!r}: must be a positive number")
        if not (math.isfinite(alpha) and alpha > 0):
            raise ValueError(f"model.lora.alpha={alpha!r}: must be a positive number")
        unknown = [t for t in self.targets if t not in TARGET_AXES]
        if unknown or not self.targets or len(set(self.targets)) != len(self.targets):
            raise ValueError(
                f"model.lora.targets={','.join(self.targets)!r}: a comma-separated list of "
                f"distinct names from {DEFAULT_TARGETS}"
                + (f" ({unknown[0]!r} is not one)" if unknown else "")
            )

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict[str, Any]:
        """The checkpoint meta's `lora` entry (targets as the config's string)."""
        return {"rank": self.rank, "alpha": float(self.alpha), "targets": ",".join(self.targets)}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> LoraConfig:
        """From a `model.lora` config section or a meta's `lora` entry (None: off)."""
        if not d:
            return cls()
        targets = d.get("targets", DEFAULT_TARGETS)
        if not isinstance(targets, str):
            raise ValueError(f"model.lora.targets={targets!r}: a comma-separated string")
        names = tuple(t.strip() for t in targets.split(",") if t.strip())
        unknown = sorted(set(d) - {"rank", "alpha", "targets"})
        if unknown:
            raise ValueError(f"model.lora.{unknown[0]}: unknown key (known: rank, alpha, targets)")
        return cls(d.get("rank", 0), d.get("alpha", 16.0), names)


def from_config(config: Any) -> LoraConfig:
    """The LoraConfig of a stage config's `model.lora` section (absent: off)."""
    section = config.model.get(LORA_KEY) if hasattr(config.model, "get") else None
    return LoraConfig.from_dict(section.to_dict() if hasattr(section, "to_dict") else section)


# ----------------------------------------------------------------------------- parameters


def is_lora(params: Any) -> bool:
    return isinstance(params, dict) and LORA_KEY in params


def trainable(params: Any) -> Any:
    """The part of `params` that trains: all of it without adapters; else the adapters
    and the scalar head (FULL_KEYS)."""
    if not is_lora(params):
        return params
    return {k: v for k, v in params.items() if k == LORA_KEY or k in FULL_KEYS}


def combine(trained: Any, params: Any) -> Any:
    """`params` with its trainable part replaced by `trained` (the inverse of `trainable`)."""
    if not is_lora(params):
        return trained
    return {**params, **trained}


def _split_shape(shape: tuple[int, ...], name: str) -> tuple[int, int, int]:
    """(lead, in, out) axis counts of a target kernel; lead is the layer axis (0 or 1)."""
    n_in, n_out = TARGET_AXES[name]
    return len(shape) - n_in - n_out, n_in, n_out


def delta(a: jax.Array, b: jax.Array, kernel_shape: tuple[int, ...], name: str) -> jax.Array:
    """A @ B reshaped to the kernel: [*lead, *in, r] x [*lead, r, *out] -> [*lead, *in, *out]."""
    lead, n_in, _ = _split_shape(kernel_shape, name)
    lead_shape = kernel_shape[:lead]
    rows = math.prod(kernel_shape[lead : lead + n_in])
    a2 = a.reshape(*lead_shape, rows, a.shape[-1])
    b2 = b.reshape(*lead_shape, b.shape[lead], -1)
    out = jnp.matmul(a2, b2, precision=jax.lax.Precision.HIGHEST)
    return out.reshape(kernel_shape)


def merge(params: Any, scale: float) -> Any:
    """The base tree with every adapted kernel W -> W + scale * A @ B (no `lora` key).
    A tree without adapters is returned as is."""
    if not is_lora(params):
        return params
    flat = traverse_util.flatten_dict({k: v for k, v in params.items() if k != LORA_KEY})
    for path, ab in traverse_util.flatten_dict(params[LORA_KEY], is_leaf=_is_pair).items():
        w = flat[path]
        d = delta(ab["a"].astype(jnp.float32), ab["b"].astype(jnp.float32), w.shape, path[-1])
        flat[path] = (w.astype(jnp.float32) + scale * d).astype(w.dtype)
    return traverse_util.unflatten_dict(flat)


def _is_adapter(node: Any) -> bool:
    return isinstance(node, dict) and set(node) == {"a", "b"}


def _is_pair(path: tuple, node: Any) -> bool:  # traverse_util's is_leaf signature
    return _is_adapter(node)


def target_paths(params: Any, targets: tuple[str, ...]) -> list[tuple[str, ...]]:
    """Paths of the kernels named in `targets` (the last path entry is the name)."""
    flat = traverse_util.flatten_dict(nn.unbox(params) if params is not None else {})
    return sorted(p for p in flat if p[-1] in targets and LORA_KEY not in p)


def init_adapters(boxed: dict, lora: LoraConfig, key: jax.Array) -> dict:
    """Adapters for the target kernels of a boxed (logically partitioned) parameter tree:
    A ~ normal(in**-0.5), B = 0, each boxed with the kernel's logical axis names."""
    flat = traverse_util.flatten_dict(boxed)
    paths = target_paths(boxed, lora.targets)
    if not paths:
        raise ValueError(
            f"model.lora.targets={','.join(lora.targets)!r}: names no weight of this model"
        )
    out = {}
    for i, path in enumerate(paths):
        box = flat[path]
        kernel = box.value if isinstance(box, nn.LogicallyPartitioned) else box
        names = box.names if isinstance(box, nn.LogicallyPartitioned) else (None,) * kernel.ndim
        lead, n_in, _ = _split_shape(kernel.shape, path[-1])
        shape_in = kernel.shape[: lead + n_in]
        a = jax.random.normal(jax.random.fold_in(key, i), (*shape_in, lora.rank), kernel.dtype)
        a = a * math.prod(kernel.shape[lead : lead + n_in]) ** -0.5
        b = jnp.zeros((*kernel.shape[:lead], lora.rank, *kernel.shape[lead + n_in :]), kernel.dtype)
        a_names = (*names[: lead + n_in], None)
        b_names = (*names[:lead], None, *names[lead + n_in :])
        out[(*path, "a")] = nn.LogicallyPartitioned(a, a_names)
        out[(*path, "b")] = nn.LogicallyPartitioned(b, b_names)
    return traverse_util.unflatten_dict(out)


def count(params: Any) -> int:
    """Number of scalars in a (sub)tree."""
    return sum(int(math.prod(x.shape)) for x in jax.tree.leaves(params))


# ----------------------------------------------------------------------------- the model


@dataclasses.dataclass(frozen=True)
class LoraModel:
    """A Transformer with adapters: `init` adds `params["lora"]`, `apply` hands it to the layers.

    Everything else (`config`, `lm_head`, `scalar_head`, ...) is the base model's.
    """

    base: Any
    lora: LoraConfig

    def __getattr__(self, name: str) -> Any:
        if name in ("base", "lora"):  # not yet set (copying, unpickling)
            raise AttributeError(name)
        return getattr(self.base, name)

    def init(self, rngs: Any, *args: Any, **kwargs: Any) -> dict:
        """The base's variables (its draws unchanged) plus boxed adapters in `params`."""
        variables = dict(self.base.init(rngs, *args, **kwargs))
        key = rngs["params"] if isinstance(rngs, dict) else rngs
        params = dict(variables["params"])
        params[LORA_KEY] = init_adapters(params, self.lora, jax.random.fold_in(key, _ADAPTER_SALT))
        variables["params"] = params
        return variables

    def apply(self, variables: dict, *args: Any, **kwargs: Any) -> Any:
        """The base on its own parameters, the adapters (B pre-scaled) in the layers'
        ADAPTERS collection: each adapted projection adds x A B (model/layers.py)."""
        params = variables["params"]
        if not is_lora(params):
            return self.base.apply(variables, *args, **kwargs)
        base = {k: v for k, v in params.items() if k != LORA_KEY}
        adapters = jax.tree.map(
            lambda ab: {"a": ab["a"], "b": self.lora.scale * ab["b"]},
            params[LORA_KEY],
            is_leaf=_is_adapter,
        )
        return self.base.apply({**variables, "params": base, ADAPTERS: adapters}, *args, **kwargs)


def merged(model: Any, params: Any) -> tuple[Any, Any]:
    """(the base model, params with the adapters merged) for a `LoraModel`, else both as
    given: merge once before a loop of forward calls (a decode loop) instead of in each."""
    if isinstance(model, LoraModel):
        return model.base, merge(params, model.lora.scale)
    return model, params


def wrap(model: Any, lora: LoraConfig) -> Any:
    """`model` with adapters when `lora.rank` > 0, else `model` itself (unchanged)."""
    return LoraModel(model, lora) if lora.enabled else model
