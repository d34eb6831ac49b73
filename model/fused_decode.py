"""A decode step as one CPU kernel call (`SamplingConfig(decode_impl="cpu")` in `generate`).

XLA runs a decode step as dozens of small ops per layer and, under the layer scan, copies
each layer's weights and K/V out of the stacked arrays before using them; at batch 1 on a
small model those costs, not the arithmetic, set the step's time (docs/benchmarks.md).
`cpu_kernels.llama_decode` instead takes the token's embedding through every block in
one call, reading the stacked weights in place and writing the new K/V into the cache in
place, then the final norm and the LM head; the embedding lookup and the sampling stay
XLA ops. The prefill is the model's own forward pass either way.

It covers the plain Llama block (RMSNorm, RoPE, SwiGLU, grouped-query attention, no
biases) in fp32; `unsupported` names the first setting outside that. The kernel reads
the layers stacked [L, ...]: a model with unrolled layers has them stacked once per
generation (`decode_params`), not per step. The logits agree with the model's own step
to fp32 rounding (the sums run in another order), not bit for bit.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from model import cpu_kernels
from model.config import PLAIN_LLAMA, ModelConfig
from model.layers import take_rows
from model.quantize import QuantizedWeight
from model.transformer import stack_layers

# Setting -> the value the kernel's block assumes: the plain Llama family fields (any
# attention_pattern whose layers are all global, checked below), SwiGLU, fp32.
KERNEL_SETTINGS = {
    **{k: v for k, v in PLAIN_LLAMA.items() if k != "attention_pattern"},
    "activation": "swiglu",
    "dtype": "float32",
    "param_dtype": "float32",
}


def unsupported(cfg: ModelConfig, params: Any) -> str | None:
    """Why the fused step cannot run this model here, or None when it can."""
    for key, want in KERNEL_SETTINGS.items():
        if getattr(cfg, key) != want:
            return f"model.{key}={getattr(cfg, key)!r} (the fused step needs {want!r})"
    if any(cfg.layer_is_local()):
        return f"model.attention_pattern={cfg.attention_pattern!r} has local layers"
    leaves = jax.tree.leaves(params, is_leaf=lambda p: isinstance(p, QuantizedWeight))
    if any(isinstance(p, QuantizedWeight) for p in leaves):
        return "int8 weights (the fused step reads fp32 weights)"
    if jax.default_backend() != "cpu":
        return f"backend {jax.default_backend()!r} (the fused step is a CPU kernel)"
    if not cpu_kernels.available():
        return "the CPU kernels did not compile (is a C++ compiler on PATH?)"
    return None


def check_supported(cfg: ModelConfig, params: Any, mesh: jax.sharding.Mesh | None = None) -> None:
    """ValueError naming why the fused step cannot run (a mesh of several devices too)."""
    reason = unsupported(cfg, params)
    if mesh is not None and mesh.size > 1:
        reason = f"it runs on one device, not a mesh of {mesh.size}"
    if reason is not None:
        raise ValueError(f"sampling.decode_impl='cpu': {reason}; use 'xla'")


def decode_params(cfg: ModelConfig, params: Any) -> Any:
    """The params `decode_step` reads: the layers stacked [L, ...] (a copy when unrolled)."""
    return params if cfg.scan_layers else stack_layers(params, cfg.num_layers)


def decode_step(
    model: nn.Module,
    params: Any,
    cache: dict,
    token: jax.Array,
    position: jax.Array,
    slot: jax.Array | int,
) -> tuple[jax.Array, dict]:
    """`generate.decode_step` through the kernel: token [B] at RoPE position [B] into
    cache slot `slot`; params from `decode_params`. Returns (next-token logits [B, V]
    fp32, the updated cache)."""
    cfg = model.config
    x = take_rows(params["embedding"], token).astype(jnp.float32)
    slot = jnp.asarray(slot, jnp.int32)
    segments = jax.lax.dynamic_update_slice(
        cache["segment_ids"], jnp.ones((token.shape[0], 1), jnp.int32), (0, slot)
    )
    logits, cache = cpu_kernels.llama_decode(
        x,
        position,
        slot,
        segments,
        params,
        cache,
        eps=cfg.norm_eps,
        theta=cfg.rope_theta,
        tied_head=cfg.tie_embeddings,
    )
    return logits, {**cache, "segment_ids": segments}
