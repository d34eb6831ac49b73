"""Model configuration: one frozen dataclass, named presets, parameter and FLOP counts.

Presets go from `tiny` (unit tests, fp32) to `7b` (Llama-2-7B shapes). Real-hardware
presets compute in bfloat16 with fp32 parameters; the CPU-sized ones compute in fp32,
since bf16 matmuls are slow and imprecise on CPU.
"""

from __future__ import annotations

import dataclasses
from typing import Any

ACTIVATIONS = ("swiglu", "gelu")
ATTENTION_IMPLS = ("xla", "cudnn")
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")
DTYPES = ("float32", "bfloat16", "float16")
NORMS = ("rmsnorm", "layernorm")
POSITIONS = ("rope", "learned", "none")  # none = NoPE: only the causal mask orders tokens


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

    def __post_init__(self) -> None:
        def check(ok: bool, key: str, why: str) -> None:
            if not ok:
                raise ValueError(f"model.{key}={getattr(self, key)!r}: {why}")

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

    def replace(self, **changes: Any) -> ModelConfig:
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown model config key(s): {sorted(unknown)}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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
    mlp_mats = 3 if cfg.activation == "swiglu" else 2
    return attn + mlp_mats * cfg.d_model * cfg.mlp_dim


def param_count(cfg: ModelConfig, include_embedding: bool = True) -> int:
    """Number of parameters of the LM (without a scalar head).

    The learned position table counts as embedding (a lookup, like the token table).
    """
    per_block = _block_matmul_param_count(cfg) + 2 * _norm_param_count(cfg)
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
