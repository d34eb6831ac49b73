"""Model configuration: one frozen dataclass, named presets, parameter and FLOP counts.

Presets go from `tiny` (unit tests, fp32) to `7b` (Llama-2-7B shapes). Real-hardware
presets compute in bfloat16 with fp32 parameters; the CPU-sized ones compute in fp32,
since bf16 matmuls are slow and imprecise on CPU.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

ACTIVATIONS = ("swiglu", "geglu", "gelu")  # geglu: gelu(tanh approx.)(x W_gate) * x W_up
GATED_ACTIVATIONS = ("swiglu", "geglu")  # three MLP matrices (gate, up, down)
ATTENTION_IMPLS = ("xla", "cudnn")
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")
DTYPES = ("float32", "bfloat16", "float16")
NORMS = ("rmsnorm", "layernorm")
POSITIONS = ("rope", "learned", "none")  # none = NoPE: only the causal mask orders tokens
# attention_pattern letters: g = global (full causal) attention, l = local (sliding window).
LAYER_KINDS = "gl"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of the decoder. Letters: D=d_model, N=heads, K=kv heads, H=head dim."""

    vocab_size: int = 256
    d_model: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 4  # 1 = MQA, < num_heads = GQA
    head_dim: int = 16
    mlp_dim: int = 256
    max_seq_len: int = 128
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    activation: str = "swiglu"
    norm: str = "rmsnorm"  # layernorm: mean-centred, learned scale and bias
    position: str = "rope"  # learned: absolute table [max_seq_len, D] added to the embedding
    dtype: str = "bfloat16"  # compute dtype
    param_dtype: str = "float32"
    dropout_rate: float = 0.0
    attention_impl: str = "xla"
    scan_layers: bool = True
    remat_policy: str = "none"
    # Families beyond Llama (Qwen2, Mistral, Gemma 1/2/3). The defaults are Llama's behaviour.
    qkv_bias: bool = False  # biases on the q, k, v projections (Qwen2)
    # Keys a local layer's query sees, itself included (HF's sliding_window); 0 = none.
    sliding_window: int = 0
    # One letter per layer from LAYER_KINDS, repeated cyclically over the layers: "l" every
    # layer local (Mistral), "lg" alternating (Gemma 2), "lllllg" (Gemma 3); "" = all global.
    attention_pattern: str = ""
    local_rope_theta: float = 0.0  # rope base of local layers (Gemma 3); 0 = rope_theta
    scale_embeddings: bool = False  # embedding * sqrt(d_model), rounded to dtype (Gemma)
    norm_scale_offset: float = 0.0  # RMSNorm multiplies by offset + scale (Gemma: 1)
    attn_scale_dim: float = 0.0  # scores * attn_scale_dim**-0.5; 0 = head_dim (Gemma 2/3)
    attn_logit_softcap: float = 0.0  # scores -> cap * tanh(scores / cap); 0 = off (Gemma 2)
    final_logit_softcap: float = 0.0  # LM logits likewise (Gemma 2)
    post_norms: bool = False  # norms on the attention and MLP outputs too (Gemma 2/3)
    qk_norm: bool = False  # RMSNorm over head_dim on queries and keys (Gemma 3)

    def __post_init__(self) -> None:
        def check(ok: bool, key: str, why: str) -> None:
            if not ok:
                raise ValueError(f"model.{key}={getattr(self, key)!r}: {why}")

        self._check_shapes(check)
        self._check_families(check)

    def _check_shapes(self, check: Callable[[bool, str, str], None]) -> None:

        for key in (
            "vocab_size",
            "d_model",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "mlp_dim",
            "max_seq_len",
        ):
            check(
                isinstance(getattr(self, key), int) and getattr(self, key) > 0,
                key,
                "must be a positive integer",
            )
        check(
            self.num_heads % self.num_kv_heads == 0,
            "num_kv_heads",
            f"must divide num_heads={self.num_heads}",
        )
        check(self.head_dim % 2 == 0, "head_dim", "must be even for rotary embeddings")
        check(self.rope_theta > 0, "rope_theta", "must be positive")
        check(self.norm_eps > 0, "norm_eps", "must be positive")
        check(0.0 <= self.dropout_rate < 1.0, "dropout_rate", "must be in [0, 1)")
        check(self.activation in ACTIVATIONS, "activation", f"must be one of {ACTIVATIONS}")
        check(self.norm in NORMS, "norm", f"must be one of {NORMS}")
        check(self.position in POSITIONS, "position", f"must be one of {POSITIONS}")
        check(
            self.attention_impl in ATTENTION_IMPLS,
            "attention_impl",
            f"must be one of {ATTENTION_IMPLS}",
        )
        check(
            self.remat_policy in REMAT_POLICIES, "remat_policy", f"must be one of {REMAT_POLICIES}"
        )
        check(self.dtype in DTYPES, "dtype", f"must be one of {DTYPES}")
        check(self.param_dtype in DTYPES, "param_dtype", f"must be one of {DTYPES}")

    def _check_families(self, check: Callable[[bool, str, str], None]) -> None:
        for key in ("qkv_bias", "scale_embeddings", "post_norms", "qk_norm"):
            check(isinstance(getattr(self, key), bool), key, "must be true or false")
        for key in (
            "local_rope_theta",
            "norm_scale_offset",
            "attn_scale_dim",
            "attn_logit_softcap",
            "final_logit_softcap",
        ):
            value = getattr(self, key)
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            check(ok and math.isfinite(value), key, "must be a finite number")
        for key in ("local_rope_theta", "attn_scale_dim", "attn_logit_softcap"):
            check(getattr(self, key) >= 0, key, "must be >= 0 (0 = off / the default)")
        check(self.final_logit_softcap >= 0, "final_logit_softcap", "must be >= 0 (0 = off)")
        window = self.sliding_window
        check(
            isinstance(window, int) and not isinstance(window, bool) and window >= 0,
            "sliding_window",
            "must be an integer >= 0 (0 = no sliding window)",
        )
        pattern = self.attention_pattern
        check(
            isinstance(pattern, str) and set(pattern) <= set(LAYER_KINDS),
            "attention_pattern",
            f"must be a string of the letters {LAYER_KINDS!r} (g global, l local)",
        )
        check(
            ("l" in pattern) == (window > 0),
            "sliding_window" if window else "attention_pattern",
            "local layers ('l' in attention_pattern) need sliding_window > 0 and vice versa",
        )
        check(
            self.norm_scale_offset == 0 or self.norm == "rmsnorm",
            "norm_scale_offset",
            "applies to rmsnorm only",
        )
        check(
            self.attn_logit_softcap == 0 or self.attention_impl == "xla",
            "attn_logit_softcap",
            "needs attention_impl='xla' (the cuDNN kernel has no soft-capping)",
        )
        check(
            self.local_rope_theta == 0 or self.position == "rope",
            "local_rope_theta",
            "needs position='rope'",
        )

    def layer_is_local(self) -> tuple[bool, ...]:
        """Per layer: True for a local (sliding-window) layer; attention_pattern repeated."""
        pattern = self.attention_pattern or "g"
        return tuple(pattern[i % len(pattern)] == "l" for i in range(self.num_layers))

    def replace(self, **changes: Any) -> ModelConfig:
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown model config key(s): {sorted(unknown)}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# The fields that pick a model family's block (norm, positions, biases, windows, Gemma's
# scalings and caps). Their ModelConfig defaults make the plain Llama-style block: what a
# checkpoint had before these fields existed, and what the fused decode kernel computes.
FAMILY_FIELDS = (
    "norm",
    "position",
    "qkv_bias",
    "sliding_window",
    "attention_pattern",
    "local_rope_theta",
    "scale_embeddings",
    "norm_scale_offset",
    "attn_scale_dim",
    "attn_logit_softcap",
    "final_logit_softcap",
    "post_norms",
    "qk_norm",
)
PLAIN_LLAMA = {
    f.name: f.default for f in dataclasses.fields(ModelConfig) if f.name in FAMILY_FIELDS
}


PRESETS: dict[str, ModelConfig] = {
    # Unit tests: fp32 so numerics can be compared at 1e-5; GQA (4 heads, 2 kv heads).
    "tiny": ModelConfig(
        vocab_size=256,
        d_model=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        mlp_dim=128,
        max_seq_len=128,
        dtype="float32",
    ),
    # ~10M parameters: laptop experiments (character or small BPE vocab).
    "10m": ModelConfig(
        vocab_size=4096,
        d_model=384,
        num_layers=6,
        num_heads=6,
        num_kv_heads=6,
        head_dim=64,
        mlp_dim=1024,
        max_seq_len=512,
        dtype="float32",
    ),
    "125m": ModelConfig(
        vocab_size=32000,
        d_model=768,
        num_layers=12,
        num_heads=12,
        num_kv_heads=12,
        head_dim=64,
        mlp_dim=2048,
        max_seq_len=2048,
    ),
    "350m": ModelConfig(
        vocab_size=32000,
        d_model=1024,
        num_layers=24,
        num_heads=16,
        num_kv_heads=16,
        head_dim=64,
        mlp_dim=2816,
        max_seq_len=2048,
    ),
    "1b": ModelConfig(
        vocab_size=32000,
        d_model=2048,
        num_layers=16,
        num_heads=16,
        num_kv_heads=8,
        head_dim=128,
        mlp_dim=5632,
        max_seq_len=2048,
        remat_policy="dots_with_no_batch_dims_saveable",
    ),
    # Llama-2-7B shapes.
    "7b": ModelConfig(
        vocab_size=32000,
        d_model=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=32,
        head_dim=128,
        mlp_dim=11008,
        max_seq_len=4096,
        norm_eps=1e-5,
        tie_embeddings=False,
        remat_policy="full",
    ),
}


def get_preset(name: str, **overrides: Any) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"model.preset={name!r}: unknown preset; choose from {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides)


def _norm_param_count(cfg: ModelConfig) -> int:
    return (2 if cfg.norm == "layernorm" else 1) * cfg.d_model  # scale (+ bias)


def _block_matmul_param_count(cfg: ModelConfig) -> int:
    attn = cfg.d_model * cfg.head_dim * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
    mlp_mats = 3 if cfg.activation in GATED_ACTIVATIONS else 2
    return attn + mlp_mats * cfg.d_model * cfg.mlp_dim


def _block_vector_param_count(cfg: ModelConfig) -> int:
    """Norm scales (two, four with post_norms), q/k norm scales and q/k/v biases."""
    count = (4 if cfg.post_norms else 2) * _norm_param_count(cfg)
    if cfg.qk_norm:
        count += 2 * cfg.head_dim
    if cfg.qkv_bias:
        count += cfg.head_dim * (cfg.num_heads + 2 * cfg.num_kv_heads)
    return count


def param_count(cfg: ModelConfig, include_embedding: bool = True) -> int:
    """Number of parameters of the LM (without a scalar head).

    The learned position table counts as embedding (a lookup, like the token table).
    """
    per_block = _block_matmul_param_count(cfg) + _block_vector_param_count(cfg)
    blocks = cfg.num_layers * per_block + _norm_param_count(cfg)  # + final norm
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model
    embed = cfg.vocab_size * cfg.d_model
    if cfg.position == "learned":
        embed += cfg.max_seq_len * cfg.d_model
    return blocks + head + (embed if include_embedding else 0)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), the PaLM appendix-B convention.

    6 * (matmul parameters, the LM head included and the embedding lookup not) plus
    12 * layers * heads * head_dim * seq_len for the attention scores and weighted sum.
    The causal mask is not discounted, as in PaLM's MFU.
    """
    matmul_params = cfg.num_layers * _block_matmul_param_count(cfg)
    matmul_params += cfg.vocab_size * cfg.d_model
    attention = 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len
    return 6.0 * matmul_params + attention
