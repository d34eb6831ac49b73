"""Hugging Face Llama interop: config and parameter mapping, sharded safetensors I/O.

Layouts. flaxlm keeps einsum-shaped kernels, HF keeps `nn.Linear` weights [out, in]:

    flaxlm                         HF (per layer i: `model.layers.{i}.`)
    embedding      [V, D]          model.embed_tokens.weight         [V, D]
    attn/q         [D, N, H]       self_attn.q_proj.weight           [N*H, D]
    attn/k, v      [D, K, H]       self_attn.{k,v}_proj.weight       [K*H, D]
    attn/o         [N, H, D]       self_attn.o_proj.weight           [D, N*H]
    mlp/gate, up   [D, F]          mlp.{gate,up}_proj.weight         [F, D]
    mlp/down       [F, D]          mlp.down_proj.weight              [D, F]
    attn_norm      [D]             input_layernorm.weight            [D]
    mlp_norm       [D]             post_attention_layernorm.weight   [D]
    final_norm     [D]             model.norm.weight                 [D]
    lm_head        [D, V]          lm_head.weight                    [V, D]  (untied only)
    scalar_head    [D]             score.weight                      [1, D]  (reward models)

With `scan_layers` the per-layer kernels are stacked on a leading [L] axis (`layers/...`),
otherwise they live under `layers_0`, `layers_1`, ... Every mapping is "reshape to the
[in, out] matrix, transpose" or the identity, so conversion is exact (a round trip
reproduces the bits). RoPE needs no permutation: `apply_rope` uses the same "rotate half"
layout (first half / second half of each head) as HF's `rotate_half`; the permutation
known from Meta's original checkpoints applies to those files, not to HF's.

What HF's Llama has and flaxlm does not is refused with the field named (`UnsupportedConfigError`):
rope scaling of any kind, partial rotary, attention or MLP biases, sliding-window or
non-full attention layers, activations other than SiLU (SwiGLU), quantized weights. A
flaxlm model with a GELU MLP is refused on export the same way.

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

CAUSAL_LM = "LlamaForCausalLM"
SEQUENCE_CLASSIFICATION = "LlamaForSequenceClassification"
# Non-parameter buffers some older checkpoints carry; skipped on import.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class UnsupportedConfigError(ValueError):
    """An HF config (or flaxlm config) this mapping cannot represent exactly."""


# ----------------------------------------------------------------------------- configs


def config_to_hf(
    cfg: ModelConfig,
    *,
    reward: bool = False,
    pad_id: int = 0,
    bos_id: int = 2,
    eos_id: int = 3,
    dtype: str = "float32",
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """flaxlm ModelConfig -> the `config.json` dict of a Llama model.

    `reward` makes a LlamaForSequenceClassification with one label. The rope base is
    written both as `rope_theta` (transformers 4.x) and `rope_parameters` (5.x); each
    version ignores the other's key. `extra` adds fields (e.g. the reward bias).
    """
    if cfg.activation != "swiglu":
        raise UnsupportedConfigError(
            f"model.activation={cfg.activation!r}: Llama has SwiGLU MLPs only; "
            "a GELU model cannot be exported as Llama"
        )
    if cfg.norm != "rmsnorm":
        raise UnsupportedConfigError(
            f"model.norm={cfg.norm!r}: Llama has RMSNorm only; cannot be exported as Llama"
        )
    if cfg.position != "rope":
        raise UnsupportedConfigError(
            f"model.position={cfg.position!r}: Llama has RoPE only; cannot be exported as Llama"
        )
    config: dict[str, Any] = {
        "architectures": [SEQUENCE_CLASSIFICATION if reward else CAUSAL_LM],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.mlp_dim,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "initializer_range": 0.02,
        "use_cache": True,
        "pad_token_id": pad_id,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "torch_dtype": dtype,
        "dtype": dtype,
    }
    if reward:
        config |= {"num_labels": 1, "id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}
    return config | dict(extra or {})


# The sizes every Llama config.json states; the other keys read below have defaults.
REQUIRED_KEYS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
)
POSITIVE_INTS = (
    *REQUIRED_KEYS,
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "num_labels",
)
# JSON types of the keys `config_from_hf` reads (null is its default for the optional ones).
KEY_TYPES: dict[str, Any] = {
    **{key: int for key in POSITIVE_INTS},
    "rms_norm_eps": (int, float),
    "rope_theta": (int, float),
    "partial_rotary_factor": (int, float),
    "model_type": str,
    "hidden_act": str,
    "architectures": list,
    "layer_types": list,
    "id2label": dict,
    "rope_scaling": dict,
    "rope_parameters": dict,
}


_WORDS = {
    int: "an integer",
    (int, float): "a number",
    str: "a string",
    list: "a list",
    dict: "an object",
}


def check_config_keys(hf: Mapping[str, Any]) -> None:
    """Refuse, naming the keys, a config.json without Llama's sizes or with a value of the
    wrong JSON type: the mapping then reads well-typed values only (no KeyError or
    TypeError from a crafted or truncated file)."""
    if not isinstance(hf, Mapping):
        raise UnsupportedConfigError(f"HF config is a {type(hf).__name__}, not a JSON object")
    missing = [key for key in REQUIRED_KEYS if hf.get(key) is None]
    if missing:
        raise UnsupportedConfigError(
            f"HF config lacks the Llama key(s) {', '.join(missing)}; not a Llama config"
        )
    for key, kind in KEY_TYPES.items():
        value = hf.get(key)
        # bool is an int in Python, never a size in JSON.
        if value is not None and (isinstance(value, bool) or not isinstance(value, kind)):
            raise UnsupportedConfigError(f"HF config {key}={value!r}: expected {_WORDS[kind]}")
        if key in POSITIVE_INTS and value is not None and value <= 0:
            raise UnsupportedConfigError(f"HF config {key}={value!r}: must be > 0")


def _refuse(field: str, value: Any, why: str) -> None:
    raise UnsupportedConfigError(f"HF config {field}={value!r}: {why}; flaxlm cannot represent it")


def _rope_theta(hf: Mapping[str, Any]) -> float:
    """The rope base, refusing every rope variant but the default one."""
    scaling = hf.get("rope_scaling")
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind not in (None, "default"):
            _refuse("rope_scaling", scaling, "rope scaling is not supported")
    params = hf.get("rope_parameters") or {}
    if "rope_type" not in params and params and all(isinstance(v, dict) for v in params.values()):
        _refuse("rope_parameters", params, "per-layer-type rope is not supported")
    if params.get("rope_type", "default") != "default":
        _refuse("rope_parameters.rope_type", params["rope_type"], "rope scaling is not supported")
    for source in (params, hf):
        factor = source.get("partial_rotary_factor", 1.0)
        if factor not in (None, 1, 1.0):
            _refuse("partial_rotary_factor", factor, "partial rotary embeddings are not supported")
    return float(params.get("rope_theta", hf.get("rope_theta", 10_000.0)))


def config_from_hf(
    hf: Mapping[str, Any], dtype: str | None = None, **overrides: Any
) -> tuple[ModelConfig, bool]:
    """An HF Llama `config.json` dict -> (flaxlm ModelConfig, is a reward model).

    dtype: the compute dtype; None follows the checkpoint (float32 stays float32, any
    16-bit checkpoint computes in bfloat16). Parameters are always `param_dtype` (fp32).
    Refuses, with the field named, a malformed config (`check_config_keys`) and whatever
    the mapping cannot represent exactly.
    """
    check_config_keys(hf)
    model_type = hf.get("model_type")
    if model_type != "llama":
        _refuse("model_type", model_type, "only Llama-architecture models are supported")
    archs = list(hf.get("architectures") or [CAUSAL_LM])
    if len(archs) != 1 or archs[0] not in (CAUSAL_LM, SEQUENCE_CLASSIFICATION):
        _refuse(
            "architectures", archs, f"expected [{CAUSAL_LM!r}] or [{SEQUENCE_CLASSIFICATION!r}]"
        )
    reward = archs[0] == SEQUENCE_CLASSIFICATION
    if reward and hf.get("num_labels", len(hf.get("id2label") or {0: 0})) != 1:
        _refuse("num_labels", hf.get("num_labels"), "a reward model has one label")
    if hf.get("hidden_act", "silu") != "silu":
        _refuse("hidden_act", hf["hidden_act"], "only SiLU-gated (SwiGLU) MLPs are supported")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            _refuse(key, hf[key], "biases are not supported")
    if hf.get("sliding_window") is not None:
        _refuse("sliding_window", hf["sliding_window"], "sliding-window attention is unsupported")
    layer_types = hf.get("layer_types") or []
    if any(t != "full_attention" for t in layer_types):
        _refuse("layer_types", layer_types, "only full attention layers are supported")
    if hf.get("quantization_config"):
        _refuse("quantization_config", hf["quantization_config"], "quantized weights")
    heads = int(hf["num_attention_heads"])
    if dtype is None:
        stored = hf.get("dtype") or hf.get("torch_dtype") or "float32"
        dtype = "float32" if stored == "float32" else "bfloat16"
    fields = dict(
        vocab_size=int(hf["vocab_size"]),
        d_model=int(hf["hidden_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or hf["hidden_size"] // heads),
        mlp_dim=int(hf["intermediate_size"]),
        max_seq_len=int(hf.get("max_position_embeddings", 2048)),
        rope_theta=_rope_theta(hf),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        activation="swiglu",
        dtype=dtype,
        dropout_rate=0.0,
    )
    return ModelConfig(**(fields | overrides)), reward


# ----------------------------------------------------------------------------- tensors


@dataclasses.dataclass(frozen=True)
class TensorMap:
    """One HF tensor <-> one flaxlm parameter (one layer's slice of it when stacked).

    path: the parameter's keys below the layer (or top-level) dict; hf: the HF name with
    `{i}` for the layer; linear_in: for a Linear weight, how many leading flaxlm axes make
    its input dimension (HF stores [out, in]); 0 means the layouts are identical.
    """

    path: tuple[str, ...]
    hf: str
    linear_in: int = 0

    def to_hf(self, x: np.ndarray) -> np.ndarray:
        """flaxlm layout -> HF layout (exact: a reshape and a transpose)."""
        if not self.linear_in:
            return x
        fan_in = math.prod(x.shape[: self.linear_in])
        return np.ascontiguousarray(x.reshape(fan_in, -1).T)

    def from_hf(self, w: np.ndarray, shape: Sequence[int]) -> np.ndarray:
        """HF layout -> flaxlm layout of `shape` (one layer's shape when stacked)."""
        if not self.linear_in:
            return w.reshape(shape)
        return w.T.reshape(shape)

    def hf_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        if not self.linear_in:
            return tuple(shape)
        fan_in = math.prod(shape[: self.linear_in])
        return (math.prod(shape) // fan_in, fan_in)


LAYER_TENSORS = (
    TensorMap(("attn_norm", "scale"), "model.layers.{i}.input_layernorm.weight"),
    TensorMap(("attn", "q"), "model.layers.{i}.self_attn.q_proj.weight", 1),
    TensorMap(("attn", "k"), "model.layers.{i}.self_attn.k_proj.weight", 1),
    TensorMap(("attn", "v"), "model.layers.{i}.self_attn.v_proj.weight", 1),
    TensorMap(("attn", "o"), "model.layers.{i}.self_attn.o_proj.weight", 2),
    TensorMap(("mlp_norm", "scale"), "model.layers.{i}.post_attention_layernorm.weight"),
    TensorMap(("mlp", "gate"), "model.layers.{i}.mlp.gate_proj.weight", 1),
    TensorMap(("mlp", "up"), "model.layers.{i}.mlp.up_proj.weight", 1),
    TensorMap(("mlp", "down"), "model.layers.{i}.mlp.down_proj.weight", 1),
)
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
    for i in range(cfg.num_layers):
        out += [Entry(t.hf.format(i=i), t, i) for t in LAYER_TENSORS]
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
