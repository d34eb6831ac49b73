"""Hugging Face `config.json` <-> ModelConfig for Llama, Qwen2, Mistral and Gemma 1/2/3.

The families (model/hf_families.py) each fix some ModelConfig fields and read or write
their own keys; what they share is here: the JSON type checks, the sizes, the
architecture names, and the choice of family on export.

Import refuses, naming the HF field (`UnsupportedConfigError`), what flaxlm cannot
represent exactly: rope scaling of any kind (Gemma 3's linear scaling of global layers
included), partial rotary, activations other than the family's, biases beyond Qwen2's
q/k/v, bidirectional attention, Gemma 3's attention soft-cap (transformers ignores it, so
its meaning is unsettled), multimodal Gemma 3 (`gemma3`), other model types, quantized
weights. Export picks the family the flaxlm config needs (`family_for`) unless one is
named, writes its config.json and reads it back: a field the written file does not
reproduce is refused with the flaxlm field named.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from model.config import ModelConfig
from model.hf_families import (
    FAMILIES,
    NUMBER,
    Family,
    UnsupportedConfigError,
    refuse,
)

# The sizes every supported config.json states; the other keys read below have defaults.
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
    "sliding_window",
    "max_window_layers",
    "sliding_window_pattern",
)
# JSON types of the keys `config_from_hf` reads (null is its default for the optional ones).
KEY_TYPES: dict[str, Any] = {
    **{key: int for key in POSITIVE_INTS},
    "rms_norm_eps": NUMBER,
    "rope_theta": NUMBER,
    "rope_local_base_freq": NUMBER,
    "partial_rotary_factor": NUMBER,
    "query_pre_attn_scalar": NUMBER,
    "attn_logit_softcapping": NUMBER,
    "final_logit_softcapping": NUMBER,
    "model_type": str,
    "hidden_act": str,
    "hidden_activation": str,
    "architectures": list,
    "layer_types": list,
    "id2label": dict,
    "rope_scaling": dict,
    "rope_parameters": dict,
    "use_sliding_window": bool,
    "tie_word_embeddings": bool,
}
_WORDS = {int: "an integer", NUMBER: "a number", str: "a string", list: "a list"}
_WORDS |= {dict: "an object", bool: "true or false"}
# Positive when present (a soft-cap or scale of 0 would divide by zero).
POSITIVE_NUMBERS = ("query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping")


def check_config_keys(hf: Mapping[str, Any]) -> None:
    """Refuse, naming the keys, a config.json without the model sizes or with a value of
    the wrong JSON type: the mapping then reads well-typed values only (no KeyError or
    TypeError from a crafted or truncated file)."""
    if not isinstance(hf, Mapping):
        raise UnsupportedConfigError(f"HF config is a {type(hf).__name__}, not a JSON object")
    missing = [key for key in REQUIRED_KEYS if hf.get(key) is None]
    if missing:
        raise UnsupportedConfigError(
            f"HF config lacks the key(s) {', '.join(missing)}; not a decoder-only LM config"
        )
    for key, kind in KEY_TYPES.items():
        value = hf.get(key)
        if value is None:
            continue
        # bool is an int in Python, never a size in JSON.
        wrong = not isinstance(value, kind) or (kind is not bool and isinstance(value, bool))
        if wrong:
            raise UnsupportedConfigError(f"HF config {key}={value!r}: expected {_WORDS[kind]}")
        if key in (*POSITIVE_INTS, *POSITIVE_NUMBERS) and value <= 0:
            raise UnsupportedConfigError(f"HF config {key}={value!r}: must be > 0")


SUPPORTED = tuple(FAMILIES)
# Fields that are numerics or layout, not architecture: not stored in config.json.
RUNTIME_FIELDS = ("dtype", "param_dtype", "dropout_rate", "attention_impl", "scan_layers")
RUNTIME_FIELDS += ("remat_policy",)


def _family(hf: Mapping[str, Any]) -> Family:
    model_type = hf.get("model_type")
    if model_type == "gemma3":
        refuse(
            "model_type",
            model_type,
            "multimodal Gemma 3 is not supported; import a Gemma3ForCausalLM (gemma3_text)",
        )
    if model_type not in FAMILIES:
        refuse("model_type", model_type, f"supported model types are {', '.join(SUPPORTED)}")
    return FAMILIES[model_type]


def config_from_hf(
    hf: Mapping[str, Any], dtype: str | None = None, **overrides: Any
) -> tuple[ModelConfig, bool]:
    """An HF `config.json` dict -> (flaxlm ModelConfig, is a reward model).

    dtype: the compute dtype; None follows the checkpoint (float32 stays float32, any
    16-bit checkpoint computes in bfloat16). Parameters are always `param_dtype` (fp32).
    Refuses, with the field named, a malformed config (`check_config_keys`) and whatever
    the mapping cannot represent exactly.
    """
    check_config_keys(hf)
    family = _family(hf)
    archs = list(hf.get("architectures") or [family.causal_lm])
    if len(archs) != 1 or archs[0] not in (family.causal_lm, family.classifier):
        refuse(
            "architectures", archs, f"expected [{family.causal_lm!r}] or [{family.classifier!r}]"
        )
    reward = archs[0] == family.classifier
    if reward and hf.get("num_labels", len(hf.get("id2label") or {0: 0})) != 1:
        refuse("num_labels", hf.get("num_labels"), "a reward model has one label")
    if hf.get("quantization_config"):
        refuse("quantization_config", hf["quantization_config"], "quantized weights")
    if hf.get("use_bidirectional_attention"):
        refuse("use_bidirectional_attention", True, "flaxlm is a causal decoder")
    heads = int(hf["num_attention_heads"])
    head_dim = int(hf.get("head_dim") or family.head_dim or hf["hidden_size"] // heads)
    if dtype is None:
        stored = hf.get("dtype") or hf.get("torch_dtype") or "float32"
        dtype = "float32" if stored == "float32" else "bfloat16"
    fields = dict(
        vocab_size=int(hf["vocab_size"]),
        d_model=int(hf["hidden_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=head_dim,
        mlp_dim=int(hf["intermediate_size"]),
        max_seq_len=int(hf.get("max_position_embeddings", 2048)),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", family.tied)),
        activation="swiglu",
        dtype=dtype,
        dropout_rate=0.0,
    )
    fields |= family.fixed
    fields |= family.read(hf)
    if fields.get("attn_scale_dim") == head_dim:  # the default scale, stated
        fields["attn_scale_dim"] = 0.0
    return ModelConfig(**(fields | overrides)), reward


def family_for(cfg: ModelConfig) -> str:
    """The HF model_type a flaxlm config exports as: the plainest family with its features."""
    if cfg.qk_norm or cfg.local_rope_theta:
        return "gemma3_text"
    if cfg.post_norms or cfg.attn_logit_softcap or cfg.final_logit_softcap or cfg.attn_scale_dim:
        return "gemma2"
    if cfg.activation == "geglu" or cfg.scale_embeddings or cfg.norm_scale_offset:
        return "gemma"
    if cfg.qkv_bias:
        return "qwen2"
    return "mistral" if cfg.sliding_window else "llama"


def architecture(cfg: ModelConfig) -> dict[str, Any]:
    """The fields config.json must reproduce, with equivalent spellings made equal."""
    out = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RUNTIME_FIELDS}
    local = cfg.layer_is_local()
    out["attention_pattern"] = local
    out["attn_scale_dim"] = cfg.attn_scale_dim or cfg.head_dim
    out["local_rope_theta"] = (cfg.local_rope_theta or cfg.rope_theta) if any(local) else None
    return out


def _refuse_everywhere(cfg: ModelConfig) -> None:
    """What no supported family has, named before a family is picked."""
    if cfg.activation not in ("swiglu", "geglu"):
        raise UnsupportedConfigError(
            f"model.activation={cfg.activation!r}: supported HF families have gated "
            "(SwiGLU or GeGLU) MLPs; a GELU model cannot be exported"
        )
    if cfg.norm != "rmsnorm":
        raise UnsupportedConfigError(
            f"model.norm={cfg.norm!r}: supported HF families have RMSNorm only; cannot export"
        )
    if cfg.position != "rope":
        raise UnsupportedConfigError(
            f"model.position={cfg.position!r}: supported HF families have RoPE only; cannot export"
        )


def config_to_hf(
    cfg: ModelConfig,
    *,
    reward: bool = False,
    pad_id: int = 0,
    bos_id: int = 2,
    eos_id: int = 3,
    dtype: str = "float32",
    extra: Mapping[str, Any] | None = None,
    model_type: str | None = None,
) -> dict[str, Any]:
    """flaxlm ModelConfig -> the `config.json` dict of an HF model.

    model_type: the HF family (None: `family_for(cfg)`). `reward` makes the family's
    SequenceClassification model with one label. The written dict is read back with
    `config_from_hf`; a field it does not reproduce is refused by name. `extra` adds
    fields (e.g. the reward bias).
    """
    _refuse_everywhere(cfg)
    model_type = model_type or family_for(cfg)
    if model_type not in FAMILIES:
        raise UnsupportedConfigError(
            f"model_type={model_type!r}: supported model types are {', '.join(SUPPORTED)}"
        )
    family = FAMILIES[model_type]
    config: dict[str, Any] = {
        "architectures": [family.classifier if reward else family.causal_lm],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.mlp_dim,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "pad_token_id": pad_id,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "torch_dtype": dtype,
        "dtype": dtype,
        **family.write(cfg),
    }
    if reward:
        config |= {"num_labels": 1, "id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}
    ours, theirs = architecture(cfg), architecture(config_from_hf(config, cfg.dtype)[0])
    for key, value in ours.items():
        if theirs[key] != value:
            raise UnsupportedConfigError(
                f"model.{key}={getattr(cfg, key)!r}: a {model_type} config.json cannot "
                f"represent it (it reads back as {getattr(config_from_hf(config)[0], key)!r})"
            )
    return config | dict(extra or {})
