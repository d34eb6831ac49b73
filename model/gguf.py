"""GGUF (llama.cpp's file format) -> Hugging Face Llama names, config and tensors, numpy only.

A GGUF file holds key/value metadata (`llama.block_count`, `tokenizer.ggml.tokens`, ...)
and tensors, each quantized by its own ggml type. `GGUFModel` reads it with
`gguf.GGUFReader` (memory-mapped) and presents what `model.hf` consumes:

    hf_config()    the config.json dict of the equivalent HF Llama model
    names()        the HF tensor names the file holds
    read(name)     one HF tensor, dequantized (`gguf.quants.dequantize`) to fp32 in HF layout

so `model.hf.params_from_hf(gguf_model.read, cfg, target)` streams it into flaxlm
parameters one tensor at a time, with no torch anywhere. The tokenizer lives in
model/gguf_tokenizer.py.

Layout. ggml lists a tensor's dims fastest-first (`ne`), the reverse of a numpy shape:
a GGUF `[576, 1536]` gate is HF's `[1536, 576]` `nn.Linear` weight, and `ReaderTensor.data`
is already in numpy order (rows of blocks for quantized types), so dequantizing gives the
HF matrix directly. llama.cpp's converter permutes the rows of q and k: per head, HF's
"rotate half" order (the first half of the head dim pairs with the second) becomes
interleaved pairs (0, H/2, 1, H/2+1, ...), i.e. rows viewed as [heads, 2, H/2] are
transposed to [heads, H/2, 2] (k with the KV head count). `unpermute_rows` transposes back.

Refused, with the file and the key or tensor named (`GGUFError`): architectures other
than llama, a mixture of experts, rope scaling (`*.rope.scaling.type`, llama 3's
`rope_freqs` tensor), partial rotary, tensors the mapping has no place for, and tensor
types gguf cannot dequantize or that hold no float weights (I8..I64, F64, Q8_1, Q8_K, ...).

Dequantization costs time: with FSDP every shard of a stacked parameter reads all its
layers, so one tensor is read once per shard. `read` keeps recently dequantized tensors
in an LRU cache bounded by `cache_bytes` (default 1 GiB); `import-gguf` sets it to the
largest parameter's fp32 size on a multi-device mesh (each tensor is then dequantized
once) and to 0 on one device (each is read once anyway), so peak host memory stays
what model/hf.py states: about one flaxlm parameter plus the shards being assembled.
"""

from __future__ import annotations

import collections
import os
import re
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType
from gguf.quants import dequantize

ARCHITECTURES = ("llama",)
# Float storage plus every block quantization gguf's numpy code dequantizes (gguf 0.19).
SUPPORTED_TYPES = frozenset(
    getattr(GGMLQuantizationType, name)
    for name in (
        *("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"),
        *("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS"),
        *("IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_NL", "IQ4_XS", "TQ1_0", "TQ2_0", "MXFP4"),
    )
    if hasattr(GGMLQuantizationType, name)
)
DEFAULT_CACHE_BYTES = 1 << 30

# GGUF tensor name -> HF Llama name ({i}: the layer).
TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_LAYER = re.compile(r"blk\.(\d+)\.(.+)")
_INT_TYPES = {
    GGUFValueType.UINT8,
    GGUFValueType.INT8,
    GGUFValueType.UINT16,
    GGUFValueType.INT16,
    GGUFValueType.UINT32,
    GGUFValueType.INT32,
    GGUFValueType.UINT64,
    GGUFValueType.INT64,
}
_FLOAT_TYPES = {GGUFValueType.FLOAT32, GGUFValueType.FLOAT64}
_MISSING = object()


class GGUFError(ValueError):
    """A GGUF file flaxlm cannot import exactly: one line naming the file and the key."""


def hf_name(gguf_name: str) -> str | None:
    """A llama GGUF tensor name -> its HF name, None when the mapping has no place for it."""
    if gguf_name in TOP_NAMES:
        return TOP_NAMES[gguf_name]
    match = _LAYER.fullmatch(gguf_name)
    if match and match.group(2) in LAYER_NAMES:
        return f"model.layers.{int(match.group(1))}.{LAYER_NAMES[match.group(2)]}"
    return None


def permute_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """HF rotate-half row order -> llama.cpp's interleaved pairs: [heads*H, ...] rows viewed
    as [heads, 2, H/2] become [heads, H/2, 2]. (What llama.cpp's converter does to q and k.)"""
    rows = w.shape[0]
    return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """The inverse of `permute_rows`: llama.cpp's q/k rows back to HF's rotate-half order."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _shortest_float(x: float) -> float:
    """A float32 metadata value as the shortest decimal that rounds to it (9.99999974e-06
    reads back as the 1e-05 the converter wrote)."""
    return float(str(np.float32(x)))


class GGUFModel:
    """One GGUF file, opened read-only; see the module docstring."""

    def __init__(self, path: str | os.PathLike, cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise GGUFError(f"{self.path}: no such file")
        try:
            self.reader = GGUFReader(self.path, "r")
        except (ValueError, OSError, IndexError, KeyError) as err:
            raise GGUFError(f"{self.path}: not a readable GGUF file ({err})") from None
        self.fields = self.reader.fields
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.architecture = self.get("general.architecture", str)
        if self.architecture not in ARCHITECTURES:
            raise GGUFError(
                f"{self.path}: general.architecture={self.architecture!r} is not supported "
                f"(flaxlm imports {', '.join(ARCHITECTURES)} GGUF files)"
            )
        self._check_types()
        self._by_hf = self._map_names()
        self._cache: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
        self.cache_bytes = cache_bytes

    # ------------------------------------------------------------------ metadata

    def get(self, key: str, kind: type, default: Any = _MISSING) -> Any:
        """Metadata `key` as `kind` (int, float, bool, str or list), refusing a missing
        key (unless a default is given) or one of another type, by name."""
        field = self.fields.get(key)
        if field is None:
            if default is _MISSING:
                raise GGUFError(f"{self.path}: metadata lacks {key}")
            return default
        main = GGUFValueType(field.types[0])
        ok = {
            int: main in _INT_TYPES,
            float: main in _FLOAT_TYPES or main in _INT_TYPES,
            bool: main == GGUFValueType.BOOL,
            str: main == GGUFValueType.STRING,
            list: main == GGUFValueType.ARRAY,
        }[kind]
        if not ok:
            raise GGUFError(f"{self.path}: {key} is a GGUF {main.name}, expected {kind.__name__}")
        value = field.contents()
        if kind is float and main == GGUFValueType.FLOAT32:
            return _shortest_float(value)
        return kind(value)

    def arch(self, key: str, kind: type, default: Any = _MISSING) -> Any:
        """An architecture key, e.g. arch("block_count", int) reads llama.block_count."""
        return self.get(f"{self.architecture}.{key}", kind, default)

    def types(self) -> dict[str, int]:
        """Tensor type name -> how many tensors have it, e.g. {"Q4_1": 210, "F32": 61}."""
        return dict(collections.Counter(t.tensor_type.name for t in self.tensors.values()))

    def _check_types(self) -> None:
        for name, tensor in self.tensors.items():
            if tensor.tensor_type not in SUPPORTED_TYPES:
                raise GGUFError(
                    f"{self.path}: tensor {name} has type {tensor.tensor_type.name}, which "
                    "flaxlm cannot dequantize (supported: "
                    f"{', '.join(sorted(t.name for t in SUPPORTED_TYPES))})"
                )

    def _refuse(self, key: str, value: Any, why: str) -> None:
        raise GGUFError(f"{self.path}: {key}={value!r}: {why}; flaxlm cannot represent it")

    def hf_config(self) -> dict[str, Any]:
        """The HF Llama config.json dict equivalent to the file's metadata (fp32 weights:
        every tensor is dequantized to float32)."""
        p = f"{self.architecture}."
        if self.arch("expert_count", int, 0) > 0:
            self._refuse(p + "expert_count", self.arch("expert_count", int), "mixture of experts")
        scaling = self.arch("rope.scaling.type", str, "none")
        if scaling != "none":
            self._refuse(p + "rope.scaling.type", scaling, "rope scaling is not supported")
        if "rope_freqs.weight" in self.tensors:
            self._refuse("rope_freqs.weight", "tensor", "llama 3 rope frequency scaling")
        for key in ("attention.head_count", "attention.head_count_kv"):
            if p + key in self.fields and self.fields[p + key].types[0] == GGUFValueType.ARRAY:
                self._refuse(p + key, "per-layer list", "per-layer head counts")
        d_model = self.arch("embedding_length", int)
        heads = self.arch("attention.head_count", int)
        kv_heads = self.arch("attention.head_count_kv", int, heads)
        head_dim = self.arch("attention.key_length", int, d_model // max(heads, 1))
        if self.arch("attention.value_length", int, head_dim) != head_dim:
            self._refuse(
                p + "attention.value_length",
                self.arch("attention.value_length", int),
                f"value heads differ from key heads ({head_dim})",
            )
        rotary = self.arch("rope.dimension_count", int, head_dim)
        if rotary != head_dim:
            why = f"partial rotary (head dim {head_dim})"
            self._refuse(p + "rope.dimension_count", rotary, why)
        if "token_embd.weight" not in self.tensors:
            raise GGUFError(f"{self.path}: no tensor token_embd.weight")
        vocab = int(self.tensors["token_embd.weight"].shape[-1])  # ne = [D, V]
        bos = self.get("tokenizer.ggml.bos_token_id", int, None)
        eos = self.get("tokenizer.ggml.eos_token_id", int, None)
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": vocab,
            "hidden_size": d_model,
            "intermediate_size": self.arch("feed_forward_length", int),
            "num_hidden_layers": self.arch("block_count", int),
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "head_dim": head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.arch("context_length", int, 2048),
            "rms_norm_eps": self.arch("attention.layer_norm_rms_epsilon", float, 1e-5),
            "rope_theta": self.arch("rope.freq_base", float, 10_000.0),
            "rope_scaling": None,
            "tie_word_embeddings": "output.weight" not in self.tensors,
            "attention_bias": False,
            "mlp_bias": False,
            "bos_token_id": bos,
            "eos_token_id": eos,
            "pad_token_id": self.get("tokenizer.ggml.padding_token_id", int, None),
            "dtype": "float32",
        }

    # ------------------------------------------------------------------ tensors

    def _map_names(self) -> dict[str, str]:
        """HF name -> GGUF name, refusing a tensor the mapping would drop."""
        out = {}
        for name in self.tensors:
            target = hf_name(name)
            if target is None:
                raise GGUFError(
                    f"{self.path}: tensor {name} has no place in a flaxlm Llama "
                    "(a bias or another architecture's tensor?)"
                )
            out[target] = name
        return out

    def names(self) -> list[str]:
        """The HF names of the file's tensors, in file order."""
        return list(self._by_hf)

    def gguf_tensor(self, gguf_name: str) -> np.ndarray:
        """One tensor dequantized to fp32 in numpy order (ne reversed), rows as stored."""
        tensor = self.tensors[gguf_name]
        shape = tuple(int(n) for n in reversed(tensor.shape))
        values = dequantize(np.asarray(tensor.data), tensor.tensor_type)
        return np.asarray(values, np.float32).reshape(shape)

    def read(self, name: str) -> np.ndarray:
        """HF tensor `name` as fp32 in HF layout (q/k rows back in rotate-half order)."""
        if name in self._cache:
            self._cache.move_to_end(name)
            return self._cache[name]
        if name not in self._by_hf:
            raise KeyError(f"{self.path}: no tensor maps to {name!r}")
        w = self.gguf_tensor(self._by_hf[name])
        if name.endswith("self_attn.q_proj.weight"):
            w = unpermute_rows(w, self.arch("attention.head_count", int))
        elif name.endswith("self_attn.k_proj.weight"):
            heads = self.arch("attention.head_count", int)
            w = unpermute_rows(w, self.arch("attention.head_count_kv", int, heads))
        w = np.ascontiguousarray(w)
        self._remember(name, w)
        return w

    def _remember(self, name: str, w: np.ndarray) -> None:
        if w.nbytes > self.cache_bytes:
            return
        self._cache[name] = w
        while sum(v.nbytes for v in self._cache.values()) > self.cache_bytes:
            self._cache.popitem(last=False)

    def clear_cache(self) -> None:
        self._cache.clear()
