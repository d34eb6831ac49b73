"""Hugging Face interop: Llama, Qwen2, Mistral, Gemma 1/2/3; tensor mapping, sharded I/O.

Families. Import reads `config.json` of model_type llama, qwen2, mistral, gemma, gemma2
and gemma3_text (Gemma3ForCausalLM), as XForCausalLM or, for reward models,
XForSequenceClassification with one label; export writes the family the flaxlm config
needs (model/hf_config.py: the config mapping; model/hf_families.py: the per-family
table). Refused with the field named (`UnsupportedConfigError`): rope scaling of any kind
(so Gemma 3 4B+ with linear scaling of its global layers), partial rotary, biases other
than Qwen2's q/k/v, activations other than SiLU-gated (Llama, Qwen2, Mistral) or
tanh-GELU-gated (Gemma), bidirectional attention, Gemma 3's attention soft-cap,
multimodal Gemma 3 (model_type gemma3), other model types, quantized weights. A flaxlm
model with a plain GELU MLP, LayerNorm or non-RoPE positions does not export.

Layouts. flaxlm keeps einsum-shaped kernels, HF keeps `nn.Linear` weights [out, in]:

    flaxlm                         HF (per layer i: `model.layers.{i}.`)
    embedding      [V, D]          model.embed_tokens.weight         [V, D]
    attn/q         [D, N, H]       self_attn.q_proj.weight           [N*H, D]
    attn/k, v      [D, K, H]       self_attn.{k,v}_proj.weight       [K*H, D]
    attn/o         [N, H, D]       self_attn.o_proj.weight           [D, N*H]
    attn/q_bias    [N, H]          self_attn.q_proj.bias             [N*H]     (Qwen2; k, v too)
    attn/q_norm    [H]             self_attn.q_norm.weight           [H]       (Gemma 3; k too)
    mlp/gate, up   [D, F]          mlp.{gate,up}_proj.weight         [F, D]
    mlp/down       [F, D]          mlp.down_proj.weight              [D, F]
    attn_norm      [D]             input_layernorm.weight            [D]
    mlp_norm       [D]             post_attention_layernorm.weight   [D]
    final_norm     [D]             model.norm.weight                 [D]
    lm_head        [D, V]          lm_head.weight                    [V, D]  (untied only)
    scalar_head    [D]             score.weight                      [1, D]  (reward models)

With post norms (Gemma 2/3) HF's names shift: post_attention_layernorm is flaxlm's
post_attn_norm (on the attention output), pre_feedforward_layernorm its mlp_norm and
post_feedforward_layernorm its post_mlp_norm. Gemma's norm weights are stored as HF
stores them (scale - 1; flaxlm's RMSNorm adds the offset), so nothing is converted.

With `scan_layers` the per-layer kernels are stacked on a leading [L] axis (`layers/...`),
otherwise they live under `layers_0`, `layers_1`, ... Every mapping is "reshape to the
[in, out] matrix, transpose" or a reshape, so conversion is exact (a round trip
reproduces the bits). RoPE needs no permutation: `apply_rope` uses the same "rotate half"
layout (first half / second half of each head) as HF's `rotate_half`; the permutation
known from Meta's original checkpoints applies to those files, not to HF's.

Streaming import. `params_from_hf` builds each target array with
`jax.make_array_from_callback` on its NamedSharding; a callback reads only the HF tensors
of the layers its shard covers, one HF tensor at a time. Peak host memory is therefore
this process's shards of one flaxlm parameter (for a stacked kernel, e.g. the [L, D, F]
gate of a 7B model at fp32, 5.8 GB unsharded) plus one HF tensor, never the whole model.
Files: model/hf_files.py.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from model.config import ModelConfig
from model.hf_config import (  # noqa: F401 (re-exported: model.hf is the interface)
    FAMILIES,
    KEY_TYPES,
    POSITIVE_INTS,
    REQUIRED_KEYS,
    SUPPORTED,
    UnsupportedConfigError,
    check_config_keys,
    config_from_hf,
    config_to_hf,
    family_for,
)

CAUSAL_LM = FAMILIES["llama"].causal_lm
SEQUENCE_CLASSIFICATION = FAMILIES["llama"].classifier
# Non-parameter buffers some older checkpoints carry; skipped on import.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


# ----------------------------------------------------------------------------- tensors


@dataclasses.dataclass(frozen=True)
class TensorMap:
    """One HF tensor <-> one flaxlm parameter (one layer's slice of it when stacked).

    path: the parameter's keys below the layer (or top-level) dict; hf: the HF name with
    `{i}` for the layer; linear_in: for a Linear weight, how many leading flaxlm axes make
    its input dimension (HF stores [out, in]); 0 means the layouts are identical, up to
    `flat`: HF keeps the tensor as a vector (a q/k/v bias: flaxlm [N, H], HF [N*H]).
    """

    path: tuple[str, ...]
    hf: str
    linear_in: int = 0
    flat: bool = False

    def to_hf(self, x: np.ndarray) -> np.ndarray:
        """flaxlm layout -> HF layout (exact: a reshape and a transpose)."""
        if not self.linear_in:
            return x.reshape(-1) if self.flat else x
        fan_in = math.prod(x.shape[: self.linear_in])
        return np.ascontiguousarray(x.reshape(fan_in, -1).T)

    def from_hf(self, w: np.ndarray, shape: Sequence[int]) -> np.ndarray:
        """HF layout -> flaxlm layout of `shape` (one layer's shape when stacked)."""
        if not self.linear_in:
            return w.reshape(shape)
        return w.T.reshape(shape)

    def hf_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        if not self.linear_in:
            return (math.prod(shape),) if self.flat else tuple(shape)
        fan_in = math.prod(shape[: self.linear_in])
        return (math.prod(shape) // fan_in, fan_in)


_LAYER = "model.layers.{i}."
# Llama's layer tensors (every family has these, Gemma 2/3 with another norm after attention).
LAYER_TENSORS = (
    TensorMap(("attn_norm", "scale"), _LAYER + "input_layernorm.weight"),
    TensorMap(("attn", "q"), _LAYER + "self_attn.q_proj.weight", 1),
    TensorMap(("attn", "k"), _LAYER + "self_attn.k_proj.weight", 1),
    TensorMap(("attn", "v"), _LAYER + "self_attn.v_proj.weight", 1),
    TensorMap(("attn", "o"), _LAYER + "self_attn.o_proj.weight", 2),
    TensorMap(("mlp_norm", "scale"), _LAYER + "post_attention_layernorm.weight"),
    TensorMap(("mlp", "gate"), _LAYER + "mlp.gate_proj.weight", 1),
    TensorMap(("mlp", "up"), _LAYER + "mlp.up_proj.weight", 1),
    TensorMap(("mlp", "down"), _LAYER + "mlp.down_proj.weight", 1),
)
QKV_BIASES = tuple(  # Qwen2
    TensorMap(("attn", f"{x}_bias"), _LAYER + f"self_attn.{x}_proj.bias", flat=True) for x in "qkv"
)
QK_NORMS = tuple(  # Gemma 3
    TensorMap(("attn", f"{x}_norm", "scale"), _LAYER + f"self_attn.{x}_norm.weight") for x in "qk"
)
# Gemma 2/3: HF's post_attention_layernorm normalises the attention output; the MLP's
# input norm is pre_feedforward_layernorm.
POST_NORMS = (
    TensorMap(("post_attn_norm", "scale"), _LAYER + "post_attention_layernorm.weight"),
    TensorMap(("mlp_norm", "scale"), _LAYER + "pre_feedforward_layernorm.weight"),
    TensorMap(("post_mlp_norm", "scale"), _LAYER + "post_feedforward_layernorm.weight"),
)


def layer_tensors(cfg: ModelConfig) -> tuple[TensorMap, ...]:
    """One layer's tensors for the features `cfg` has (the family is not consulted)."""
    out = [t for t in LAYER_TENSORS if not (cfg.post_norms and t.path[0] == "mlp_norm")]
    if cfg.qkv_bias:
        out += QKV_BIASES
    if cfg.qk_norm:
        out += QK_NORMS
    if cfg.post_norms:
        out += POST_NORMS
    return tuple(out)


EMBEDDING = TensorMap(("embedding",), "model.embed_tokens.weight")
FINAL_NORM = TensorMap(("final_norm", "scale"), "model.norm.weight")
LM_HEAD = TensorMap(("lm_head",), "lm_head.weight", 1)
SCALAR_HEAD = TensorMap(("scalar_head",), "score.weight", 1)


@dataclasses.dataclass(frozen=True)
class Entry:
    """An HF tensor's place in the flaxlm tree: `layer` is None for top-level params."""

    name: str
    tensor: TensorMap
    layer: int | None


def entries(cfg: ModelConfig, lm_head: bool = True, scalar_head: bool = False) -> list[Entry]:
    """Every HF tensor of the model, in HF's order (embedding, layers, norm, head)."""
    out = [Entry(EMBEDDING.hf, EMBEDDING, None)]
    tensors = layer_tensors(cfg)
    for i in range(cfg.num_layers):
        out += [Entry(t.hf.format(i=i), t, i) for t in tensors]
    out.append(Entry(FINAL_NORM.hf, FINAL_NORM, None))
    if lm_head and not cfg.tie_embeddings:
        out.append(Entry(LM_HEAD.hf, LM_HEAD, None))
    if scalar_head:
        out.append(Entry(SCALAR_HEAD.hf, SCALAR_HEAD, None))
    return out


def _get(tree: Mapping[str, Any], path: Sequence[str]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def flax_leaf(params: Mapping[str, Any], entry: Entry, scan_layers: bool) -> Any:
    """The flaxlm array holding `entry` (the whole [L, ...] stack when scanned)."""
    if entry.layer is None:
        return _get(params, entry.tensor.path)
    layers = params["layers"] if scan_layers else params[f"layers_{entry.layer}"]
    return _get(layers, entry.tensor.path)


def to_host(x: Any) -> np.ndarray:
    """A (possibly sharded, single-process) array -> numpy on the host."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        raise ValueError("export needs every shard on this process: run it on one host")
    return np.asarray(jax.device_get(x))


def hf_tensor(params: Mapping[str, Any], entry: Entry, cfg: ModelConfig) -> np.ndarray:
    """One HF tensor from flaxlm params (only that layer's slice is fetched)."""
    leaf = flax_leaf(params, entry, cfg.scan_layers)
    if entry.layer is not None and cfg.scan_layers:
        leaf = leaf[entry.layer]
    return entry.tensor.to_hf(to_host(leaf))


def params_to_hf(
    params: Mapping[str, Any], cfg: ModelConfig, lm_head: bool = True, scalar_head: bool = False
) -> Iterator[tuple[str, np.ndarray]]:
    """Stream (HF name, tensor) pairs from flaxlm params, one tensor in host memory at a time."""
    for entry in entries(cfg, lm_head, scalar_head):
        yield entry.name, hf_tensor(params, entry, cfg)


def _normalize(index: tuple, shape: Sequence[int]) -> tuple[slice, ...]:
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    return tuple(slice(*s.indices(n)) for s, n in zip(index, shape, strict=True))


def leaf_reader(
    read: Callable[[str], np.ndarray],
    layer_entries: Sequence[Entry],
    shape: Sequence[int],
    stacked: bool,
    dtype: Any,
) -> Callable[[tuple], np.ndarray]:
    """index -> that slice of one flaxlm parameter, converted from HF tensors.

    layer_entries: the HF tensors of this parameter, one per layer when `stacked`
    (shape [L, ...]) else exactly one. Only the layers the slice covers are read, one at
    a time; identical indices (replicated shards) are read once.
    """
    memo: dict[tuple, np.ndarray] = {}

    def one(entry: Entry, part_shape: Sequence[int], rest: tuple[slice, ...]) -> np.ndarray:
        w = read(entry.name)
        if tuple(w.shape) != entry.tensor.hf_shape(part_shape):
            raise ValueError(
                f"HF tensor {entry.name} has shape {tuple(w.shape)}, the config implies "
                f"{entry.tensor.hf_shape(part_shape)}"
            )
        return np.asarray(entry.tensor.from_hf(w, part_shape)[rest], dtype)

    def callback(index: tuple) -> np.ndarray:
        index = _normalize(index, shape)
        key = tuple((s.start, s.stop, s.step) for s in index)
        if key not in memo:
            if stacked:
                layers = range(shape[0])[index[0]]
                parts = [one(layer_entries[i], shape[1:], index[1:]) for i in layers]
                memo[key] = np.stack(parts)
            else:
                memo[key] = one(layer_entries[0], shape, index)
        return memo[key]

    return callback


def _leaf_entries(
    cfg: ModelConfig, lm_head: bool, scalar_head: bool
) -> dict[tuple[str, ...], list[Entry]]:
    """flaxlm leaf path -> the HF entries it is built from."""
    grouped: dict[tuple[str, ...], list[Entry]] = {}
    for entry in entries(cfg, lm_head, scalar_head):
        if entry.layer is None:
            path = entry.tensor.path
        elif cfg.scan_layers:
            path = ("layers", *entry.tensor.path)
        else:
            path = (f"layers_{entry.layer}", *entry.tensor.path)
        grouped.setdefault(path, []).append(entry)
    return grouped


def params_from_hf(
    read: Callable[[str], np.ndarray],
    cfg: ModelConfig,
    target: Any,
    lm_head: bool = True,
    scalar_head: bool = False,
    scalar_bias: float = 0.0,
) -> Any:
    """HF tensors -> flaxlm params shaped and sharded like `target`.

    target: the params tree of ShapeDtypeStructs with NamedShardings (or of
    np.ndarray-like leaves, which yields host numpy arrays). Each leaf is assembled
    shard by shard (`jax.make_array_from_callback`). `scalar_bias` fills a reward
    model's `scalar_bias`, which HF's bias-free score layer does not hold.
    """
    grouped = _leaf_entries(cfg, lm_head, scalar_head)
    flat, treedef = jax.tree_util.tree_flatten_with_path(target)
    out = []
    for path, leaf in flat:
        keys = tuple(str(getattr(k, "key", k)) for k in path)
        dtype = np.dtype(leaf.dtype)
        sharding = getattr(leaf, "sharding", None)
        if keys == ("scalar_bias",):
            value = np.full(leaf.shape, scalar_bias, dtype)
            out.append(value if sharding is None else jax.device_put(value, sharding))
            continue
        if keys not in grouped:
            raise ValueError(f"no HF tensor maps to the flaxlm parameter {'/'.join(keys)}")
        stacked = keys[0] == "layers"
        callback = leaf_reader(read, grouped[keys], leaf.shape, stacked, dtype)
        if sharding is None:
            out.append(callback((slice(None),) * len(leaf.shape)))
        else:
            out.append(jax.make_array_from_callback(leaf.shape, sharding, callback))
    return jax.tree_util.tree_unflatten(treedef, out)


def check_names(
    available: Sequence[str], cfg: ModelConfig, lm_head: bool = True, scalar_head: bool = False
) -> None:
    """Refuse a checkpoint that lacks a needed tensor or holds one the mapping would drop.

    Allowed extras: rotary buffers, and `lm_head.weight` of a tied model (tied
    checkpoints sometimes store the copy).
    """
    wanted = {e.name for e in entries(cfg, lm_head, scalar_head)}
    missing = sorted(wanted - set(available))
    if missing:
        raise ValueError(f"HF checkpoint lacks {len(missing)} tensor(s), e.g. {missing[:3]}")
    ignorable = {LM_HEAD.hf} if cfg.tie_embeddings or not lm_head else set()
    extra = sorted(
        n for n in set(available) - wanted - ignorable if not n.endswith(IGNORED_SUFFIXES)
    )
    if extra:
        raise UnsupportedConfigError(
            f"HF checkpoint holds tensors flaxlm has no place for, e.g. {extra[:3]} "
            "(biases or another architecture?)"
        )
