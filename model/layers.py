"""Leaf layers: RMSNorm, LayerNorm, rotary embedding, attention (GQA, causal + segment
masks, KV cache), MLP.

Einsum letters: B batch, T query length, S key length, D model, N heads, K kv heads,
G query heads per kv head (N = K * G), H head dim, F mlp. Every parameter carries logical
axis names (model/sharding.py); softmax, norms and rotary angles run in fp32 whatever the
compute dtype.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.ad_checkpoint import checkpoint_name

from model import sharding as sh
from model.quantize import QuantizedWeight

# Finite rather than -inf so a fully masked row (a pad query) stays NaN-free.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def param_init(stddev: float, names: tuple[str | None, ...]) -> Callable:
    return nn.with_logical_partitioning(nn.initializers.normal(stddev), names)


# project()'s outputs carry this name, so remat policies can save them (model/transformer.py):
# a policy that saves dots cannot see a dot inside a custom_vjp.
PROJECTION = "projection"


def project(spec: str, x: jax.Array, w: jax.Array, out_dtype=None) -> jax.Array:
    """jnp.einsum(spec, x, w) of an activation x and a weight w, with a hand-written backward.

    Autodiff contracts the weight gradient as (cotangent, activation) over the token axes,
    and XLA's CPU dot transposes its left operand, fused into whatever produced it: for the
    MLP's up and gate projections that is the silu backward, a strided [tokens, mlp_dim]
    write that took more time than the matmuls beside it. Here the narrower of the two goes
    on the left, so the array transposed is the [tokens, d_model] one. Same values; the
    train step is about 20 % faster on CPU (docs/benchmarks.md). An int8 weight
    (model/quantize.py) projects with its own kernel, for decoding only.
    """
    if isinstance(w, QuantizedWeight):
        return w.project(spec, x, out_dtype)
    return checkpoint_name(_project(spec, x, w, out_dtype), PROJECTION)


def take_rows(table: jax.Array | QuantizedWeight, ids: jax.Array) -> jax.Array:
    """table[ids] along the first axis, for a plain or an int8 (model/quantize.py) table."""
    if isinstance(table, QuantizedWeight):
        return table.take(ids)
    return jnp.take(table, ids, axis=0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def _project(spec: str, x: jax.Array, w: jax.Array, out_dtype) -> jax.Array:
    return jnp.einsum(spec, x, w, preferred_element_type=out_dtype)


def _project_fwd(spec, x, w, out_dtype):
    return _project(spec, x, w, out_dtype), (x, w)


def _project_bwd(spec, out_dtype, residuals, g):
    x, w = residuals
    x_axes, rest = spec.split(",")
    w_axes, out_axes = rest.split("->")
    dx = jnp.einsum(f"{out_axes},{w_axes}->{x_axes}", g, w).astype(x.dtype)
    x_width = math.prod(n for a, n in zip(x_axes, x.shape, strict=True) if a in w_axes)
    g_width = math.prod(n for a, n in zip(out_axes, g.shape, strict=True) if a in w_axes)
    if x_width <= g_width:
        dw = jnp.einsum(f"{x_axes},{out_axes}->{w_axes}", x, g)
    else:
        # The weight's transpose, kept apart by the barrier: otherwise XLA folds the
        # transpose into the dot by swapping its operands back.
        g_first = "".join(a for a in out_axes if a in w_axes) + "".join(
            a for a in x_axes if a in w_axes
        )
        dw_t = jax.lax.optimization_barrier(jnp.einsum(f"{out_axes},{x_axes}->{g_first}", g, x))
        dw = jnp.einsum(f"{g_first}->{w_axes}", dw_t)
    return dx, dw.astype(w.dtype)


_project.defvjp(_project_fwd, _project_bwd)


# Low-rank adapters (model/lora.py) reach the layers as this variable collection: under each
# adapted kernel's name, {"a": A [*in, r], "b": scale * B [r, *out]}.
ADAPTERS = "lora"


def low_rank(spec: str, x: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    """(x A) B, shaped like project(spec, x, W) for a kernel W whose input axes A carries
    (then the rank axis) and whose output axes B carries (after it)."""
    x_axes, rest = spec.split(",")
    w_axes, out_axes = rest.split("->")
    w_in = "".join(c for c in w_axes if c in x_axes)
    w_out = "".join(c for c in w_axes if c not in x_axes)
    kept = "".join(c for c in x_axes if c not in w_axes)
    r = next(c for c in "RZYXWQ" if c not in spec)
    # _project's backward puts the narrow operand first: dA = (dxa^T x)^T, not x^T dxa,
    # which would have XLA CPU write a transposed copy of x (see `project`).
    xa = _project(f"{x_axes},{w_in}{r}->{kept}{r}", x, a, None)
    return _project(f"{kept}{r},{r}{w_out}->{out_axes}", xa, b, None)


def adapted_project(module: nn.Module, name: str, spec: str, x: jax.Array, w: jax.Array):
    """project(spec, x, w), plus x A B when the module was given an adapter for kernel
    `name`. Adding the low-rank path, rather than projecting with W + A B, keeps the
    backward pass from forming the kernel-sized gradient of a frozen W: a LoRA step costs
    about 4 FLOPs per frozen weight and token instead of 6 (docs/benchmarks.md)."""
    out = project(spec, x, w)
    adapter = module.get_variable(ADAPTERS, name)
    if adapter is None:
        return out
    return out + low_rank(spec, x, adapter["a"].astype(x.dtype), adapter["b"].astype(x.dtype))


class RMSNorm(nn.Module):
    """x / rms(x) * (scale_offset + scale), in fp32, returned in the compute dtype.

    Gemma stores the scale minus one (`scale_offset` 1, the parameter initialised to 0);
    keeping HF's parameter as is makes import and export exact.
    """

    eps: float = 1e-6
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    scale_offset: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.initializers.constant(1.0 - self.scale_offset)
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(init, (sh.NORM,)),
            (x.shape[-1],),
            self.param_dtype,
        )
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        scale32 = scale.astype(jnp.float32)
        if self.scale_offset:
            scale32 = self.scale_offset + scale32
        return (x32 * scale32).astype(self.dtype)


class LayerNorm(nn.Module):
    """(x - mean(x)) / std(x) * scale + bias (biased variance), in fp32 like RMSNorm."""

    eps: float = 1e-6
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        def vector(name: str, init: Callable) -> jax.Array:
            param = nn.with_logical_partitioning(init, (sh.NORM,))
            return self.param(name, param, (x.shape[-1],), self.param_dtype).astype(jnp.float32)

        scale, bias = vector("scale", nn.initializers.ones), vector("bias", nn.initializers.zeros)
        x32 = x.astype(jnp.float32)
        x32 = x32 - jnp.mean(x32, axis=-1, keepdims=True)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (x32 * scale + bias).astype(self.dtype)


# ModelConfig.norm -> layer; both take (eps, dtype, param_dtype).
NORMS: dict[str, type[nn.Module]] = {"rmsnorm": RMSNorm, "layernorm": LayerNorm}


def apply_rope(x: jax.Array, positions: jax.Array, theta: float | jax.Array) -> jax.Array:
    """Rotary embedding, 'rotate half' layout (first half / second half of H are the pairs).

    x: [B, T, N, H]; positions: [B, T] (restart at 0 per packed document); theta: the
    base, a float or a traced scalar (a per-layer base under the layer scan).
    """
    half = x.shape[-1] // 2
    inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions.astype(jnp.float32)[:, :, None] * inv_freq  # [B, T, H/2]
    sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def attention_mask(
    q_segment_ids: jax.Array,
    kv_segment_ids: jax.Array,
    q_slots: jax.Array,
    kv_slots: jax.Array,
    window: int = 0,
) -> jax.Array:
    """Boolean [B, T, S]: same non-pad segment and key slot not after the query slot.

    Segment id 0 marks padding. Slots are positions in the (cache) buffer, not RoPE
    positions, so causality holds across packed documents and left padding alike.
    `window` > 0 also limits a query to the `window` slots ending at its own (HF's
    sliding window, kv > q - window). Within a row's document the slots are consecutive
    (left pad, prompt, then generated tokens), so slot distance is token distance.
    """
    same_doc = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    not_pad = (kv_segment_ids != 0)[:, None, :]
    causal = kv_slots[None, None, :] <= q_slots[:, :, None]
    mask = same_doc & not_pad & causal
    if window:
        mask = mask & (kv_slots[None, None, :] > q_slots[:, :, None] - window)
    return mask


def _probs(
    scores: jax.Array, mask: jax.Array, h: int, scale: float | None, logit_softcap: float
) -> jax.Array:
    """Scaled, capped, masked softmax of fp32 scores [B, K, G, T, S]; mask [B, T, S]."""
    scores = scores * (h**-0.5 if scale is None else scale)
    if logit_softcap:
        scores = jnp.tanh(scores / logit_softcap) * logit_softcap
    scores = jnp.where(mask[:, None, None, :, :], scores, MASK_VALUE)
    return jax.nn.softmax(scores, axis=-1)


def xla_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array,
    scale: float | None = None,
    logit_softcap: float = 0.0,
) -> jax.Array:
    """Plain einsum attention with GQA. q: [B,T,N,H], k/v: [B,S,K,H], mask: [B,T,S].

    scale: of the scores (None = H**-0.5); logit_softcap > 0: scores -> cap * tanh(scores /
    cap) before masking (Gemma 2), in fp32.
    """
    b, t, n, h = q.shape
    kv = k.shape[2]
    q = q.reshape(b, t, kv, n // kv, h)
    scores = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32)
    probs = _probs(scores, mask, h, scale, logit_softcap).astype(v.dtype)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v)
    return out.reshape(b, t, n, h)


def xla_cached_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array,
    scale: float | None = None,
    logit_softcap: float = 0.0,
) -> jax.Array:
    """`xla_attention` over a KV cache's heads-first k/v [B, K, S, H] (q [B, T, N, H]).

    Both products are plain batched matmuls over each head's [S, H] block, so a decode
    step reads the cache as stored instead of transposing each layer's whole buffer.
    Training keeps `xla_attention`: its sums run in the order the sharded-training tests
    pin down."""
    b, t, n, h = q.shape
    kv = k.shape[1]
    q = q.reshape(b, t, kv, n // kv, h).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, H]
    scores = jnp.einsum("BKGTH,BKSH->BKGTS", q, k, preferred_element_type=jnp.float32)
    probs = _probs(scores, mask, h, scale, logit_softcap).astype(v.dtype)
    out = jnp.einsum("BKGTS,BKSH->BKGTH", probs, v)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


def cudnn_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array,
    scale: float | None = None,
    logit_softcap: float = 0.0,
) -> jax.Array:
    """Fused cuDNN flash attention (GPU, bf16/fp16); GQA is handled by the kernel.

    The kernel has no soft-capping (ModelConfig refuses the combination).
    """
    if logit_softcap:
        raise ValueError("cudnn attention has no logit soft-capping; use attention_impl='xla'")
    return jax.nn.dot_product_attention(
        q, k, v, mask=mask[:, None], scale=scale, implementation="cudnn"
    )


# The seam for kernels: a Pallas/splash TPU kernel registers here with the same signature,
# fn(q, k, v, mask, scale=None, logit_softcap=0.0).
ATTENTION_FNS: dict[str, Callable[..., jax.Array]] = {
    "xla": xla_attention,
    "cudnn": cudnn_attention,
}


class Attention(nn.Module):
    """Multi-head attention with rotary positions (unless `rope` is off) and grouped kv heads.

    With `cache` (dict with k, v: [L, B, K, S, H], the stacked cache of every layer) the
    new keys/values are written in place at (`layer`, `cache_index`) and queries attend over
    this layer's whole buffer; the mask says which slots are live. Writing one slice of the
    stacked buffer (rather than passing per-layer caches through the layer scan) lets XLA
    update the cache in place. With `starts_cache` (a prefill writing slots [0, T)) the
    queries attend over this call's keys only: causality keeps every query off the slots
    past T, so the rest of the buffer would cost scores and change nothing. Returns
    (output [B, T, D], updated cache or None).

    Options (off by default): `qkv_bias` adds q/k/v biases [N or K, H] (Qwen2); `qk_norm`
    RMS-normalises each query and key head over H before RoPE (Gemma 3); `scale` replaces
    H**-0.5; `logit_softcap` caps the scores (Gemma 2). The call's `rope_theta` overrides
    the field: under the layer scan it is a traced per-layer base (Gemma 3's local layers).
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_layers: int  # scales the output projection's init (residual-stream growth)
    rope_theta: float = 10_000.0
    attention_impl: str = "xla"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    rope: bool = True  # False: learned absolute positions or NoPE, added/absent outside
    qkv_bias: bool = False
    qk_norm: bool = False
    norm_eps: float = 1e-6  # of the q/k norms
    norm_scale_offset: float = 0.0  # of the q/k norms (RMSNorm.scale_offset)
    scale: float | None = None  # of the scores; None = head_dim**-0.5
    logit_softcap: float = 0.0
    starts_cache: bool = False  # a prefill from slot 0: attend over this call's keys only

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        mask: jax.Array,
        cache: dict | None = None,
        cache_index: jax.Array | None = None,
        layer: jax.Array | int = 0,
        rope_theta: float | jax.Array | None = None,
    ) -> tuple[jax.Array, dict | None]:
        d = x.shape[-1]
        n, kv, h = self.num_heads, self.num_kv_heads, self.head_dim

        def proj(name: str, heads: int, axis: str) -> jax.Array:
            w = self.param(
                name,
                param_init(d**-0.5, (sh.EMBED, axis, sh.HEAD_DIM)),
                (d, heads, h),
                self.param_dtype,
            )
            out = adapted_project(self, name, "BTD,DNH->BTNH", x, w.astype(self.dtype))
            if self.qkv_bias:
                init = nn.with_logical_partitioning(nn.initializers.zeros, (axis, sh.HEAD_DIM))
                bias = self.param(f"{name}_bias", init, (heads, h), self.param_dtype)
                out = out + bias.astype(self.dtype)
            return out

        def norm(name: str) -> RMSNorm:
            return RMSNorm(
                self.norm_eps, self.dtype, self.param_dtype, self.norm_scale_offset, name=name
            )

        q, k = proj("q", n, sh.HEADS), proj("k", kv, sh.KV_HEADS)
        if self.qk_norm:
            q, k = norm("q_norm")(q), norm("k_norm")(k)
        if self.rope:
            theta = self.rope_theta if rope_theta is None else rope_theta
            q = apply_rope(q, positions, theta)
            k = apply_rope(k, positions, theta)
        v = proj("v", kv, sh.KV_HEADS)
        q = nn.with_logical_constraint(q, (sh.ACT_BATCH, sh.ACT_LENGTH, sh.ACT_HEADS, sh.HEAD_DIM))

        if cache is not None:  # the new [B, T, K, H] go in at [layer, :, :, cache_index]
            start = (layer, 0, 0, cache_index, 0)
            cache = {
                name: jax.lax.dynamic_update_slice(
                    cache[name], new.swapaxes(1, 2)[None].astype(cache[name].dtype), start
                )
                for name, new in (("k", k), ("v", v))
            }
            if not self.starts_cache:
                k, v = (
                    jax.lax.dynamic_index_in_dim(cache[n], layer, keepdims=False).astype(self.dtype)
                    for n in "kv"
                )  # [B, K, S, H]

        options = {"scale": self.scale, "logit_softcap": self.logit_softcap}
        from_buffer = cache is not None and not self.starts_cache
        if from_buffer and self.attention_impl == "xla":
            out = xla_cached_attention(q, k, v, mask, **options)
        elif from_buffer:
            out = ATTENTION_FNS[self.attention_impl](
                q, k.swapaxes(1, 2), v.swapaxes(1, 2), mask, **options
            )
        else:
            out = ATTENTION_FNS[self.attention_impl](q, k, v, mask, **options)
        wo = self.param(
            "o",
            param_init(
                (n * h) ** -0.5 / (2 * self.num_layers) ** 0.5, (sh.HEADS, sh.HEAD_DIM, sh.EMBED)
            ),
            (n, h, d),
            self.param_dtype,
        )
        return adapted_project(self, "o", "BTNH,NHD->BTD", out, wo.astype(self.dtype)), cache


# Gated activations: name -> the gate's nonlinearity.
GATES: dict[str, Callable[[jax.Array], jax.Array]] = {
    "swiglu": jax.nn.silu,
    "geglu": functools.partial(jax.nn.gelu, approximate=True),
}


class MLP(nn.Module):
    """SwiGLU (silu(x W_gate) * x W_up) W_down, GeGLU (the same with gelu's tanh
    approximation, HF's gelu_pytorch_tanh: Gemma), or GELU (gelu(x W_up) W_down)."""

    mlp_dim: int
    num_layers: int
    activation: str = "swiglu"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d, f = x.shape[-1], self.mlp_dim

        def weight(name: str, shape: tuple[int, int], std: float, names: tuple) -> jax.Array:
            return self.param(name, param_init(std, names), shape, self.param_dtype).astype(
                self.dtype
            )

        up_w = weight("up", (d, f), d**-0.5, (sh.EMBED, sh.MLP))
        up = adapted_project(self, "up", "BTD,DF->BTF", x, up_w)
        if self.activation in GATES:
            gate_w = weight("gate", (d, f), d**-0.5, (sh.EMBED, sh.MLP))
            gate = adapted_project(self, "gate", "BTD,DF->BTF", x, gate_w)
            hidden = GATES[self.activation](gate) * up
        else:
            hidden = jax.nn.gelu(up)
        hidden = nn.with_logical_constraint(hidden, (sh.ACT_BATCH, sh.ACT_LENGTH, sh.ACT_MLP))
        down = weight("down", (f, d), f**-0.5 / (2 * self.num_layers) ** 0.5, (sh.MLP, sh.EMBED))
        return adapted_project(self, "down", "BTF,FD->BTD", hidden, down)
