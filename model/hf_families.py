"""The Hugging Face model families flaxlm maps: per family, its architectures, the
ModelConfig fields it fixes, and its config.json reader and writer (model/hf_config.py
holds what they share and the public `config_from_hf` / `config_to_hf`).

    model_type    flaxlm fields it sets
    llama         (none: the default model)
    qwen2         qkv_bias; sliding-window layers when use_sliding_window (layer_types)
    mistral       sliding_window on every layer (null: none)
    gemma         activation geglu, scale_embeddings, norm_scale_offset 1
    gemma2        + post_norms, attention/final logit soft-caps, attn_scale_dim
                  (query_pre_attn_scalar), alternating local/global layers (layer_types)
    gemma3_text   + qk_norm, local_rope_theta (rope_parameters.sliding_attention)

Readers take a config.json dict already type-checked by `check_config_keys` and return
ModelConfig fields; they refuse (`UnsupportedConfigError`, the HF field named) whatever
the family has and flaxlm cannot represent exactly. A key a family's transformers class
does not read is ignored, as transformers ignores it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from model.config import ModelConfig

NUMBER = (int, float)


class UnsupportedConfigError(ValueError):
    """An HF config (or flaxlm config) this mapping cannot represent exactly."""


def refuse(field: str, value: Any, why: str) -> None:
    raise UnsupportedConfigError(f"HF config {field}={value!r}: {why}; flaxlm cannot represent it")


def _default_rope_theta(params: Mapping[str, Any], field: str, fallback: float) -> float:
    """The base of one rope_parameters dict, refusing every rope variant but the default."""
    if params.get("rope_type", params.get("type", "default")) not in (None, "default"):
        refuse(f"{field}.rope_type", params.get("rope_type"), "rope scaling is not supported")
    factor = params.get("partial_rotary_factor", 1.0)
    if factor not in (None, 1, 1.0):
        refuse("partial_rotary_factor", factor, "partial rotary embeddings are not supported")
    theta = params.get("rope_theta", fallback)
    if isinstance(theta, bool) or not isinstance(theta, NUMBER) or theta <= 0:
        refuse(f"{field}.rope_theta", theta, "expected a positive number")
    return float(theta)


def _rope_theta(hf: Mapping[str, Any]) -> float:
    """The rope base of a one-rope model (transformers 4.x and 5.x keys)."""
    scaling = hf.get("rope_scaling")
    if scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
        refuse("rope_scaling", scaling, "rope scaling is not supported")
    params = hf.get("rope_parameters") or {}
    if "rope_type" not in params and params and all(isinstance(v, dict) for v in params.values()):
        refuse("rope_parameters", params, "per-layer-type rope is not supported")
    if hf.get("partial_rotary_factor", 1.0) not in (None, 1, 1.0):
        refuse("partial_rotary_factor", hf["partial_rotary_factor"], "partial rotary")
    return _default_rope_theta(params, "rope_parameters", float(hf.get("rope_theta", 10_000.0)))


def _gemma3_rope(hf: Mapping[str, Any]) -> tuple[float, float]:
    """(global, local) rope bases: rope_parameters per layer type (5.x) or rope_theta,
    rope_local_base_freq and rope_scaling (4.x; the scaling applies to global layers)."""
    if hf.get("rope_scaling"):
        refuse("rope_scaling", hf["rope_scaling"], "rope scaling is not supported")
    params = hf.get("rope_parameters") or {}
    full, sliding = params.get("full_attention") or {}, params.get("sliding_attention") or {}
    if not isinstance(full, dict) or not isinstance(sliding, dict):
        refuse("rope_parameters", params, "expected an object per layer type")
    return (
        _default_rope_theta(full, "rope_parameters.full_attention", hf.get("rope_theta", 1e6)),
        _default_rope_theta(
            sliding, "rope_parameters.sliding_attention", hf.get("rope_local_base_freq", 1e4)
        ),
    )


def _pattern(local: list[bool]) -> str:
    """Per-layer local flags -> the shortest attention_pattern that repeats to them."""
    letters = "".join("l" if x else "g" for x in local)
    if "l" not in letters:
        return ""
    for period in range(1, len(letters) + 1):
        if all(letters[i] == letters[i % period] for i in range(len(letters))):
            return letters[:period]
    return letters


def _layer_types(hf: Mapping[str, Any], default: list[str]) -> list[bool]:
    """HF layer_types (or the family's default) -> per-layer local flags."""
    kinds = hf.get("layer_types") or default
    known = {"full_attention": False, "sliding_attention": True}
    if len(kinds) != hf["num_hidden_layers"] or any(k not in known for k in kinds):
        refuse("layer_types", kinds, f"expected one of {sorted(known)} per layer")
    return [known[k] for k in kinds]


def _windowed(hf: Mapping[str, Any], local: list[bool]) -> dict[str, Any]:
    """sliding_window and attention_pattern for per-layer local flags."""
    if not any(local):
        return {"sliding_window": 0, "attention_pattern": ""}
    window = hf.get("sliding_window", 4096)
    if window is None:
        refuse("sliding_window", window, "sliding layers need a window size")
    return {"sliding_window": int(window), "attention_pattern": _pattern(local)}


def _activation(hf: Mapping[str, Any], key: str, allowed: tuple[str, ...]) -> None:
    value = hf.get(key, allowed[0])
    if value not in allowed:
        refuse(key, value, f"this family's supported activation is {allowed[0]}")


# ----------------------------------------------------------------------------- families


def _read_llama(hf: Mapping[str, Any]) -> dict[str, Any]:
    _activation(hf, "hidden_act", ("silu",))
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            refuse(key, hf[key], "biases are not supported")
    if hf.get("sliding_window") is not None:
        refuse("sliding_window", hf["sliding_window"], "Llama has no sliding window")
    if any(_layer_types(hf, ["full_attention"] * hf["num_hidden_layers"])):
        refuse("layer_types", hf["layer_types"], "Llama has full attention layers only")
    return {"rope_theta": _rope_theta(hf)}


def _read_qwen2(hf: Mapping[str, Any]) -> dict[str, Any]:
    _activation(hf, "hidden_act", ("silu",))
    local = [False] * hf["num_hidden_layers"]
    if hf.get("use_sliding_window"):  # transformers drops the window otherwise
        first = hf.get("max_window_layers", 28)
        default = [
            "sliding_attention" if i >= first else "full_attention" for i in range(len(local))
        ]
        local = _layer_types(hf, default)
    return {"rope_theta": _rope_theta(hf), **_windowed(hf, local)}


def _read_mistral(hf: Mapping[str, Any]) -> dict[str, Any]:
    _activation(hf, "hidden_act", ("silu",))
    # transformers' Mistral ignores layer_types: a window applies to every layer.
    local = [hf.get("sliding_window", 4096) is not None] * hf["num_hidden_layers"]
    return {"rope_theta": _rope_theta(hf), **_windowed(hf, local)}


def _read_gemma(hf: Mapping[str, Any]) -> dict[str, Any]:
    # "gelu" is the legacy name of Gemma's tanh approximation (transformers rewrites it).
    _activation(hf, "hidden_act", ("gelu_pytorch_tanh", "gelu"))
    if hf.get("attention_bias"):
        refuse("attention_bias", hf["attention_bias"], "biases are not supported")
    return {"rope_theta": _rope_theta(hf)}


def _read_gemma2_common(hf: Mapping[str, Any], default_pattern: int) -> dict[str, Any]:
    _activation(hf, "hidden_activation", ("gelu_pytorch_tanh",))
    if hf.get("attention_bias"):
        refuse("attention_bias", hf["attention_bias"], "biases are not supported")
    n = hf["num_hidden_layers"]
    default = [
        "sliding_attention" if (i + 1) % default_pattern else "full_attention" for i in range(n)
    ]
    return {
        "attn_scale_dim": float(hf.get("query_pre_attn_scalar", 256)),  # 0 if = head_dim
        **_windowed(hf, _layer_types(hf, default)),
    }


def _read_gemma2(hf: Mapping[str, Any]) -> dict[str, Any]:
    caps = {
        "attn_logit_softcap": float(hf.get("attn_logit_softcapping", 50.0) or 0.0),
        "final_logit_softcap": float(hf.get("final_logit_softcapping", 30.0) or 0.0),
    }
    return {"rope_theta": _rope_theta(hf), **caps, **_read_gemma2_common(hf, 2)}


def _read_gemma3(hf: Mapping[str, Any]) -> dict[str, Any]:
    if hf.get("attn_logit_softcapping") is not None:
        refuse(
            "attn_logit_softcapping",
            hf["attn_logit_softcapping"],
            "transformers' Gemma 3 does not apply it, so its meaning is unsettled",
        )
    fields = _read_gemma2_common(hf, hf.get("sliding_window_pattern", 6))
    rope_theta, local_theta = _gemma3_rope(hf)
    if fields["sliding_window"] and local_theta != rope_theta:
        fields["local_rope_theta"] = local_theta
    final_cap = float(hf.get("final_logit_softcapping") or 0.0)
    return {"rope_theta": rope_theta, "final_logit_softcap": final_cap, **fields}


def _write_rope(cfg: ModelConfig) -> dict[str, Any]:
    # Both transformers 4.x (rope_theta) and 5.x (rope_parameters) keys; each ignores the other.
    return {
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
    }


def _write_layer_types(cfg: ModelConfig) -> list[str]:
    return ["sliding_attention" if x else "full_attention" for x in cfg.layer_is_local()]


def _write_llama(cfg: ModelConfig) -> dict[str, Any]:
    return {
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "pretraining_tp": 1,
        **_write_rope(cfg),
    }


def _write_qwen2(cfg: ModelConfig) -> dict[str, Any]:
    windowed = bool(cfg.sliding_window)
    return {
        "hidden_act": "silu",
        "use_sliding_window": windowed,
        "sliding_window": cfg.sliding_window or None,
        "max_window_layers": cfg.num_layers,
        "layer_types": _write_layer_types(cfg),
        **_write_rope(cfg),
    }


def _write_mistral(cfg: ModelConfig) -> dict[str, Any]:
    return {"hidden_act": "silu", "sliding_window": cfg.sliding_window or None, **_write_rope(cfg)}


def _write_gemma(cfg: ModelConfig) -> dict[str, Any]:
    return {"hidden_act": "gelu_pytorch_tanh", "attention_bias": False, **_write_rope(cfg)}


def _scale_dim(cfg: ModelConfig) -> int:
    """query_pre_attn_scalar: transformers' config class takes an integer only."""
    value = cfg.attn_scale_dim or cfg.head_dim
    if value != int(value):
        raise UnsupportedConfigError(
            f"model.attn_scale_dim={value!r}: Gemma's query_pre_attn_scalar is an integer"
        )
    return int(value)


def _write_gemma2_common(cfg: ModelConfig) -> dict[str, Any]:
    return {
        "hidden_activation": "gelu_pytorch_tanh",
        "attention_bias": False,
        "query_pre_attn_scalar": _scale_dim(cfg),
        "final_logit_softcapping": cfg.final_logit_softcap or None,
        "sliding_window": cfg.sliding_window or None,
        "layer_types": _write_layer_types(cfg),
        "use_bidirectional_attention": False,
    }


def _write_gemma2(cfg: ModelConfig) -> dict[str, Any]:
    caps = {"attn_logit_softcapping": cfg.attn_logit_softcap or None}
    return {**_write_gemma2_common(cfg), **caps, **_write_rope(cfg)}


def _write_gemma3(cfg: ModelConfig) -> dict[str, Any]:
    local = cfg.local_rope_theta or cfg.rope_theta
    rope = {
        "full_attention": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "sliding_attention": {"rope_type": "default", "rope_theta": local},
    }
    return {
        **_write_gemma2_common(cfg),
        "attn_logit_softcapping": None,
        "rope_theta": cfg.rope_theta,
        "rope_local_base_freq": local,
        "rope_scaling": None,
        "rope_parameters": rope,
    }


@dataclasses.dataclass(frozen=True)
class Family:
    """One HF model_type: architectures, the fields it fixes, its config reader/writer."""

    model_type: str
    causal_lm: str
    classifier: str
    fixed: Mapping[str, Any]
    read: Callable[[Mapping[str, Any]], dict[str, Any]]
    write: Callable[[ModelConfig], dict[str, Any]]
    head_dim: int | None = None  # config.json's default head_dim (None: hidden / heads)
    tied: bool = False  # default of tie_word_embeddings


_GEMMA = {"activation": "geglu", "scale_embeddings": True, "norm_scale_offset": 1.0}
FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family(
            "llama",
            "LlamaForCausalLM",
            "LlamaForSequenceClassification",
            {},
            _read_llama,
            _write_llama,
        ),
        Family(
            "qwen2",
            "Qwen2ForCausalLM",
            "Qwen2ForSequenceClassification",
            {"qkv_bias": True},
            _read_qwen2,
            _write_qwen2,
        ),
        Family(
            "mistral",
            "MistralForCausalLM",
            "MistralForSequenceClassification",
            {},
            _read_mistral,
            _write_mistral,
        ),
        Family(
            "gemma",
            "GemmaForCausalLM",
            "GemmaForSequenceClassification",
            _GEMMA,
            _read_gemma,
            _write_gemma,
            256,
            True,
        ),
        Family(
            "gemma2",
            "Gemma2ForCausalLM",
            "Gemma2ForSequenceClassification",
            _GEMMA | {"post_norms": True},
            _read_gemma2,
            _write_gemma2,
            256,
            True,
        ),
        Family(
            "gemma3_text",
            "Gemma3ForCausalLM",
            "Gemma3TextForSequenceClassification",
            _GEMMA | {"post_norms": True, "qk_norm": True},
            _read_gemma3,
            _write_gemma3,
            256,
            True,
        ),
    )
}
