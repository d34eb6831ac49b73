"""The decoder-only Transformer: embedding, pre-norm blocks under nn.scan, LM and scalar heads.

Inputs are token ids [B, T] with optional `positions` [B, T] (RoPE or learned-table
positions, restarting per packed document) and `segment_ids` [B, T] (document ids within
a row, 0 = padding).
With a KV cache (see `init_cache`) the same call serves prefill (T = prompt length) and
decode (T = 1): new keys are written at `cache_index` and attention spans the buffer
(a prefill, `cache_index` the int 0, attends over its own keys: the same result, fewer
scores).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from model import sharding as sh
from model.config import ModelConfig
from model.layers import (
    ADAPTERS,
    MLP,
    NORMS,
    PROJECTION,
    Attention,
    RMSNorm,
    attention_mask,
    param_init,
    project,
    take_rows,
)

_policies = jax.checkpoint_policies
_projections = _policies.save_only_these_names(PROJECTION)
# The weight projections are dots without batch dims, run through project().
REMAT_POLICIES = {
    "full": None,  # save nothing, recompute the whole block
    "dots_saveable": _policies.save_from_both_policies(_policies.dots_saveable, _projections),
    "dots_with_no_batch_dims_saveable": _policies.save_from_both_policies(
        _policies.dots_with_no_batch_dims_saveable, _projections
    ),
}


class TransformerOutput(NamedTuple):
    logits: jax.Array | None  # [B, T, V] fp32 ([B, 1, V]: last_logits_only; None: no LM head)
    scalars: jax.Array | None  # [B, T] fp32 (None without the scalar head)
    hidden: jax.Array  # [B, T, D] after the final norm
    cache: dict | None  # updated KV cache, when one was passed


def make_norm(cfg: ModelConfig, name: str) -> nn.Module:
    """The config's norm layer (RMSNorm with Gemma's scale offset when set)."""
    dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    if cfg.norm_scale_offset:
        return RMSNorm(cfg.norm_eps, dtype, pdtype, cfg.norm_scale_offset, name=name)
    return NORMS[cfg.norm](cfg.norm_eps, dtype, pdtype, name=name)


def layer_attention(
    cfg: ModelConfig, masks: tuple[jax.Array, jax.Array | None], layer: jax.Array | int
) -> tuple[jax.Array, float | jax.Array]:
    """(mask [B, T, S], rope base) of one layer: global or local (sliding window).

    masks: (global, local or None). Under the layer scan `layer` is traced, so a model
    mixing both kinds selects with `jnp.where` on a constant per-layer table (no Python
    branch per layer); a model of one kind uses that kind's mask directly.
    """
    local = cfg.layer_is_local()
    local_theta = cfg.local_rope_theta or cfg.rope_theta
    if all(local):
        return masks[1], local_theta
    if not any(local):
        return masks[0], cfg.rope_theta
    if isinstance(layer, int):
        return (masks[1], local_theta) if local[layer] else (masks[0], cfg.rope_theta)
    is_local = jnp.asarray(local)[layer]
    theta = jnp.where(is_local, jnp.float32(local_theta), jnp.float32(cfg.rope_theta))
    return jnp.where(is_local, masks[1], masks[0]), theta


class Block(nn.Module):
    """Pre-norm residual block: x + Attn(Norm(x)), then x + MLP(Norm(x)).

    With `post_norms` (Gemma 2/3) the attention and MLP outputs are normalised too before
    the residual add: x + Norm(Attn(Norm(x))), then x + Norm(MLP(Norm(x))).
    """

    config: ModelConfig
    deterministic: bool = True
    starts_cache: bool = False  # a prefill from slot 0 (Attention.starts_cache)

    @nn.compact
    def __call__(
        self,
        carry: tuple[jax.Array, dict | None],
        positions: jax.Array,
        masks: tuple[jax.Array, jax.Array | None],
        cache_index: jax.Array | None,
        layer: jax.Array | int,
    ) -> tuple[tuple[jax.Array, dict | None], None]:
        """carry = (x [B, T, D], stacked cache or None); scan-shaped: (carry, xs) -> (carry, ys).

        masks: (global, local or None), each [B, T, S] (`layer_attention`).
        """
        x, cache = carry
        cfg = self.config
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        mask, theta = layer_attention(cfg, masks, layer)
        h = make_norm(cfg, "attn_norm")(x)
        h, cache = Attention(
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
            cfg.num_layers,
            cfg.rope_theta,
            cfg.attention_impl,
            dtype,
            pdtype,
            rope=cfg.position == "rope",
            qkv_bias=cfg.qkv_bias,
            qk_norm=cfg.qk_norm,
            norm_eps=cfg.norm_eps,
            norm_scale_offset=cfg.norm_scale_offset,
            scale=cfg.attn_scale_dim**-0.5 if cfg.attn_scale_dim else None,
            logit_softcap=cfg.attn_logit_softcap,
            starts_cache=self.starts_cache,
            name="attn",
        )(h, positions, mask, cache, cache_index, layer, theta)
        if cfg.post_norms:
            h = make_norm(cfg, "post_attn_norm")(h)
        x = x + nn.Dropout(cfg.dropout_rate)(h, deterministic=self.deterministic)
        h = make_norm(cfg, "mlp_norm")(x)
        h = MLP(cfg.mlp_dim, cfg.num_layers, cfg.activation, dtype, pdtype, name="mlp")(h)
        if cfg.post_norms:
            h = make_norm(cfg, "post_mlp_norm")(h)
        x = x + nn.Dropout(cfg.dropout_rate)(h, deterministic=self.deterministic)
        x = nn.with_logical_constraint(x, (sh.ACT_BATCH, sh.ACT_LENGTH, sh.ACT_EMBED))
        return (x, cache), None


def _block_class(cfg: ModelConfig) -> type[nn.Module]:
    if cfg.remat_policy == "none":
        return Block
    # Under scan, CSE cannot merge recomputation with the forward pass, so it stays off.
    return nn.remat(Block, policy=REMAT_POLICIES[cfg.remat_policy], prevent_cse=not cfg.scan_layers)


class Transformer(nn.Module):
    """Decoder LM. `lm_head` gives next-token logits, `scalar_head` a reward/value per token."""

    config: ModelConfig
    lm_head: bool = True
    scalar_head: bool = False

    @nn.compact
    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        cache: dict | None = None,
        cache_index: jax.Array | int | None = None,
        deterministic: bool = True,
        last_logits_only: bool = False,
    ) -> TransformerOutput:
        cfg = self.config
        batch, length = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
        if segment_ids is None:
            segment_ids = jnp.ones((batch, length), jnp.int32)
        # A prefill (cache_index the int 0) attends over its own keys (Attention).
        starts = cache is not None and isinstance(cache_index, int) and cache_index == 0
        if cache is not None:
            cache_index = jnp.asarray(cache_index, jnp.int32)
        masks, kv_segments = _call_masks(cfg, segment_ids, cache, cache_index, starts)
        layer_cache = None if cache is None else {"k": cache["k"], "v": cache["v"]}

        # Parameters are created in a fixed order (embedding, layers, heads): linen draws
        # each one's init key from a per-module counter, so the order fixes the values.
        x, embedding = self._embed(tokens, positions)
        layer_args = (positions, masks, cache_index, deterministic, starts)
        x, layer_cache = self._layers(x, layer_cache, *layer_args)
        hidden = make_norm(cfg, "final_norm")(x)
        # A prefill needs the next-token logits at the last slot only: [B, 1, V].
        head_in = hidden[:, -1:] if last_logits_only else hidden
        logits = self._lm_head(head_in, embedding) if self.lm_head else None
        scalars = self._scalar_head(hidden) if self.scalar_head else None

        new_cache = None
        if cache is not None:
            new_cache = {"k": layer_cache["k"], "v": layer_cache["v"], "segment_ids": kv_segments}
        return TransformerOutput(logits, scalars, hidden, new_cache)

    def _embed(self, tokens: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(x [B, T, D] in the compute dtype, the embedding table [V, D])."""
        cfg = self.config
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        embedding = self.param(
            "embedding",
            param_init(cfg.d_model**-0.5, (sh.VOCAB, sh.EMBED)),
            (cfg.vocab_size, cfg.d_model),
            pdtype,
        )
        x = take_rows(embedding, tokens).astype(dtype)
        if cfg.scale_embeddings:
            # Gemma: the factor is rounded to the compute dtype first, as HF does.
            x = x * jnp.asarray(cfg.d_model**0.5, dtype)
        if cfg.position == "learned":
            # Read at `positions`, not slot indices: packed documents restart at 0 and a
            # decode step (T = 1) gets its true position. Clipped, since pad slots may hold
            # any value and generation refuses to run past max_seq_len.
            table = self.param(
                "position_embedding",
                param_init(cfg.d_model**-0.5, (sh.POSITION, sh.EMBED)),
                (cfg.max_seq_len, cfg.d_model),
                pdtype,
            )
            x = x + jnp.take(table, positions, axis=0, mode="clip").astype(dtype)
        x = nn.with_logical_constraint(x, (sh.ACT_BATCH, sh.ACT_LENGTH, sh.ACT_EMBED))
        return x, embedding

    def _layers(
        self,
        x: jax.Array,
        layer_cache: dict | None,
        positions: jax.Array,
        masks: tuple[jax.Array, jax.Array | None],
        cache_index: jax.Array | None,
        deterministic: bool,
        starts_cache: bool,
    ) -> tuple[jax.Array, dict | None]:
        """The blocks: one scanned `layers` module, or `layers_0` … `layers_{L-1}`."""
        cfg = self.config
        block = _block_class(cfg)
        carry = (x, layer_cache)
        if cfg.scan_layers:
            stack = nn.scan(
                block,
                variable_axes={"params": 0, ADAPTERS: 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0),
                length=cfg.num_layers,
                metadata_params={nn.PARTITION_NAME: sh.LAYERS},
            )
            layers = jnp.arange(cfg.num_layers)
            carry, _ = stack(cfg, deterministic, starts_cache, name="layers")(
                carry, positions, masks, cache_index, layers
            )
        else:
            for i in range(cfg.num_layers):
                carry, _ = block(cfg, deterministic, starts_cache, name=f"layers_{i}")(
                    carry, positions, masks, cache_index, i
                )
        return carry

    def _lm_head(self, hidden: jax.Array, embedding: jax.Array) -> jax.Array:
        """Next-token logits [B, T, V] fp32 (tied to the embedding, or an `lm_head` [D, V])."""
        cfg = self.config
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        if cfg.tie_embeddings:
            head = embedding.T
        else:
            head = self.param(
                "lm_head",
                param_init(cfg.d_model**-0.5, (sh.EMBED, sh.VOCAB)),
                (cfg.d_model, cfg.vocab_size),
                pdtype,
            )
        logits = project("BTD,DV->BTV", hidden, head.astype(dtype), jnp.float32)
        if cfg.final_logit_softcap:
            cap = cfg.final_logit_softcap
            logits = jnp.tanh(logits / cap) * cap
        return nn.with_logical_constraint(logits, (sh.ACT_BATCH, sh.ACT_LENGTH, sh.ACT_VOCAB))

    def _scalar_head(self, hidden: jax.Array) -> jax.Array:
        """One fp32 scalar per token [B, T] (reward or value)."""
        cfg = self.config
        pdtype = jnp.dtype(cfg.param_dtype)
        # Small init (std 1/sqrt(D+1)) so initial rewards/values are O(1).
        w = self.param(
            "scalar_head",
            param_init((cfg.d_model + 1) ** -0.5, (sh.EMBED,)),
            (cfg.d_model,),
            pdtype,
        )
        b = self.param(
            "scalar_bias", nn.with_logical_partitioning(nn.initializers.zeros, ()), (), pdtype
        )
        return jnp.einsum("BTD,D->BT", hidden.astype(jnp.float32), w.astype(jnp.float32)) + b


def _call_masks(
    cfg: ModelConfig,
    segment_ids: jax.Array,
    cache: dict | None,
    cache_index: jax.Array | None,
    starts_cache: bool = False,
) -> tuple[tuple[jax.Array, jax.Array | None], jax.Array]:
    """((global mask, local mask or None), the key segment ids [B, S] to keep) for one call.

    Without a cache, or when the call starts one (a prefill from slot 0), the keys are
    this call's tokens (masks [B, T, T]); otherwise they are the whole buffer, this call's
    segment ids written at `cache_index` (masks [B, T, S]). The local mask exists only
    with sliding-window layers.
    """
    batch, length = segment_ids.shape
    q_slots = jnp.broadcast_to(jnp.arange(length), (batch, length))
    kv_segments, kv_slots = segment_ids, jnp.arange(length)
    if cache is not None:
        kept = jax.lax.dynamic_update_slice(
            cache["segment_ids"], segment_ids.astype(jnp.int32), (0, cache_index)
        )
        if not starts_cache:
            kv_segments, kv_slots = kept, jnp.arange(kept.shape[1])
            q_slots = q_slots + cache_index
    mask_args = (segment_ids, kv_segments, q_slots, kv_slots)
    masks = (
        attention_mask(*mask_args),
        attention_mask(*mask_args, window=cfg.sliding_window) if cfg.sliding_window else None,
    )
    return masks, kv_segments if cache is None else kept


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype: Any = None) -> dict:
    """Empty KV cache: k/v [L, B, K, S, H] (kv heads only) and segment ids [B, S] (0 = empty).

    Heads before slots: one head's keys are one contiguous [S, H] matrix, the layout both
    attention products read, so a decode step reads the cache without transposing it."""
    dtype = jnp.dtype(cfg.dtype if dtype is None else dtype)
    shape = (cfg.num_layers, batch, cfg.num_kv_heads, length, cfg.head_dim)
    return {
        "k": jnp.zeros(shape, dtype),
        "v": jnp.zeros(shape, dtype),
        "segment_ids": jnp.zeros((batch, length), jnp.int32),
    }


# Logical axes of the cache, for sharding it by the same rules as the model.
CACHE_AXES = {
    "k": (sh.LAYERS, sh.ACT_BATCH, sh.ACT_KV_HEADS, sh.CACHE_LENGTH, sh.HEAD_DIM),
    "v": (sh.LAYERS, sh.ACT_BATCH, sh.ACT_KV_HEADS, sh.CACHE_LENGTH, sh.HEAD_DIM),
    "segment_ids": (sh.ACT_BATCH, sh.CACHE_LENGTH),
}


def unstack_layers(params: dict, num_layers: int) -> dict:
    """Scanned params ({'layers': [L, ...]}) -> per-layer params ({'layers_0': ..., ...})."""
    params = dict(params)
    stacked = params.pop("layers")
    for i in range(num_layers):
        params[f"layers_{i}"] = jax.tree.map(lambda p, i=i: p[i], stacked)
    return params


def stack_layers(params: dict, num_layers: int) -> dict:
    """Per-layer params -> scanned params; the inverse of `unstack_layers`."""
    params = dict(params)
    layers = [params.pop(f"layers_{i}") for i in range(num_layers)]
    params["layers"] = jax.tree.map(lambda *p: jnp.stack(p), *layers)
    return params
