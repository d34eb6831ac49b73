"""Qwen2, Mistral and Gemma 1/2/3 import and export against `transformers` itself.

Per family: a tiny random HF model (4 layers, d 64, vocab 256, fp32, a sliding window of
5 keys on 20-token rows, soft-caps and a non-default attention scale where the family has
them) is saved, imported with `flaxlm import-hf`'s function, compared on logits of a
left-padded batch (max abs diff <= 1e-4) and on 16 greedy tokens decoded with the KV cache
(identical to `generate(do_sample=False)`), then exported and reloaded by transformers
(logits again, the same class, bit-identical tensors). No download.
"""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import require
from flax import linen as nn

torch = require("torch")
transformers = require("transformers")
safetensors_torch = require("safetensors.torch")

from model import generate, hf, hf_files, sharding  # noqa: E402
from model.config import ModelConfig, param_count  # noqa: E402
from model.transformer import Transformer, unstack_layers  # noqa: E402
from orchestrate import cli  # noqa: E402
from train import hf_cli  # noqa: E402
from train.checkpoint import Checkpointer  # noqa: E402
from train.parent import (  # noqa: E402
    InitFromError,
    Parent,
    child_model_dict,
    load_params,
    read_parent,
)
from train.state import abstract_sharded_params  # noqa: E402

TOLERANCE = 1e-4
WINDOW = 5
COMMON = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
    pad_token_id=0,
    bos_token_id=2,
    eos_token_id=3,
)
GEMMA3_ROPE = {
    "full_attention": {"rope_type": "default", "rope_theta": 1e6},
    "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
}
# model_type -> (config class, model class, config fields beyond COMMON, flaxlm fields).
FAMILIES = {
    "qwen2": (
        "Qwen2Config",
        "Qwen2ForCausalLM",
        dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1, rope_theta=500.0),
        dict(qkv_bias=True, attention_pattern="glll", rope_theta=500.0),
    ),
    "mistral": (
        "MistralConfig",
        "MistralForCausalLM",
        dict(sliding_window=WINDOW),
        dict(sliding_window=WINDOW, attention_pattern="l"),
    ),
    "gemma": (
        "GemmaConfig",
        "GemmaForCausalLM",
        dict(),
        dict(activation="geglu", scale_embeddings=True, norm_scale_offset=1.0),
    ),
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        dict(
            sliding_window=WINDOW,
            attn_logit_softcapping=5.0,
            final_logit_softcapping=3.0,
            query_pre_attn_scalar=24,
        ),
        dict(attention_pattern="lg", attn_logit_softcap=5.0, final_logit_softcap=3.0),
    ),
    "gemma3_text": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        dict(
            sliding_window=WINDOW,
            layer_types=["sliding_attention"] * 2 + ["full_attention", "sliding_attention"],
            final_logit_softcapping=3.0,
            query_pre_attn_scalar=24,
            rope_parameters=GEMMA3_ROPE,
        ),
        dict(attention_pattern="llg", qk_norm=True, local_rope_theta=1e4, attn_scale_dim=24.0),
    ),
}


def hf_model(model_type: str, seed: int = 0):
    """A random HF model of the family; every weight (norms too) ~ N(0, 0.2^2)."""
    config_cls, model_cls, fields, _ = FAMILIES[model_type]
    config = getattr(transformers, config_cls)(**COMMON, **fields)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model


def padded_batch(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """tokens, mask (1 = real), positions [3, 20]: rows left-padded by 0, 6 and 11 slots."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(4, 256, (3, 20))
    mask = np.ones_like(tokens)
    mask[1, :6], mask[2, :11] = 0, 0
    tokens[mask == 0] = 0
    return tokens, mask, np.maximum(np.cumsum(mask, axis=1) - 1, 0)


def torch_logits(model, tokens, mask, positions) -> np.ndarray:
    with torch.no_grad():
        out = model(
            torch.tensor(tokens),
            attention_mask=torch.tensor(mask),
            position_ids=torch.tensor(positions),
        )
    return out.logits.float().numpy()


def flax_logits(cfg: ModelConfig, params, tokens, mask, positions) -> np.ndarray:
    out = Transformer(cfg).apply({"params": params}, tokens, positions, mask)
    return np.asarray(out.logits)


def max_diff(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    return float(np.abs(a - b)[mask == 1].max())  # pad queries attend to nothing: skipped


def load(workdir: pathlib.Path, cfg: ModelConfig):
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    target = abstract_sharded_params(Transformer(cfg), mesh, sharding.get_rules("dp"))
    return load_params(read_parent(workdir), target)


@pytest.fixture(scope="module", params=list(FAMILIES))
def imported(request, tmp_path_factory):
    model_type = request.param
    root = tmp_path_factory.mktemp(model_type)
    model = hf_model(model_type)
    model.save_pretrained(root / "hf")
    # Streamed into FSDP x TP shards (biases, q/k norms and post norms included).
    hf_cli.import_hf(root / "hf", root / "run", "float32", (2, 2, 2), "fsdp_tp")
    cfg = ModelConfig(**read_parent(root / "run").model)
    return {
        "type": model_type,
        "root": root,
        "model": model,
        "cfg": cfg,
        "params": load(root / "run", cfg),
    }


def test_import_logits_match_with_left_padding(imported):
    cfg, params, model = imported["cfg"], imported["params"], imported["model"]
    for key, value in FAMILIES[imported["type"]][3].items():
        assert getattr(cfg, key) == value, key
    tokens, mask, positions = padded_batch(seed=1)
    theirs = torch_logits(model, tokens, mask, positions)
    diff = max_diff(flax_logits(cfg, params, tokens, mask, positions), theirs, mask)
    print(f"[hf families] import {imported['type']}: max abs logit diff {diff:.3g}")
    assert diff <= TOLERANCE
    # Per-layer params (no scan): the layer kind is then a Python index, same logits.
    unscanned = flax_logits(
        cfg.replace(scan_layers=False),
        unstack_layers(params, cfg.num_layers),
        tokens,
        mask,
        positions,
    )
    assert max_diff(unscanned, theirs, mask) <= TOLERANCE
    # The window (or Gemma's features) matter on these rows: without them the logits move.
    plain = cfg.replace(sliding_window=0, attention_pattern="", local_rope_theta=0.0)
    if cfg.sliding_window:
        assert max_diff(flax_logits(plain, params, tokens, mask, positions), theirs, mask) > 1e-2


def test_greedy_generation_with_kv_cache_matches(imported):
    cfg, params, model = imported["cfg"], imported["params"], imported["model"]
    tokens, mask, _ = padded_batch(seed=2)
    tokens, mask = tokens[:, :12], mask[:, :12]  # prompts of 12, 6 and 1 tokens
    tokens[mask == 0] = COMMON["pad_token_id"]
    with torch.no_grad():
        theirs = model.generate(
            torch.tensor(tokens),
            attention_mask=torch.tensor(mask),
            max_new_tokens=16,
            do_sample=False,
            eos_token_id=None,  # run all 16 tokens, as ours does without eos_id
            pad_token_id=COMMON["pad_token_id"],
        )[:, tokens.shape[1] :].numpy()
    ours = generate.generate(
        Transformer(cfg),
        params,
        tokens,
        mask,
        jax.random.key(0),
        max_new_tokens=16,
        sampling=generate.SamplingConfig(temperature=0.0),
    ).tokens
    np.testing.assert_array_equal(np.asarray(ours), theirs)


def test_export_reloads_in_transformers(imported):
    root, cfg = imported["root"], imported["cfg"]
    out = root / "exported"
    assert cli.main(["export-hf", "--workdir", str(root / "run"), "--out", str(out)]) == 0
    config = json.loads((out / hf_files.CONFIG_FILE).read_text())
    assert config["model_type"] == imported["type"]
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(model) is type(imported["model"])
    tokens, mask, positions = padded_batch(seed=3)
    ours = flax_logits(cfg, imported["params"], tokens, mask, positions)
    diff = max_diff(torch_logits(model, tokens, mask, positions), ours, mask)
    print(f"[hf families] export {imported['type']}: max abs logit diff {diff:.3g}")
    assert diff <= TOLERANCE
    original = safetensors_torch.load_file(root / "hf" / hf_files.SINGLE_FILE)
    again = safetensors_torch.load_file(out / hf_files.SINGLE_FILE)
    original.pop("lm_head.weight", None) if cfg.tie_embeddings else None
    assert sorted(again) == sorted(original)
    for name, tensor in original.items():
        assert torch.equal(tensor, again[name]), name


def test_param_count_matches_the_initialized_model(imported):
    cfg = imported["cfg"]
    shapes = jax.eval_shape(
        lambda: Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    )
    actual = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(shapes)))
    assert actual == param_count(cfg) == imported["model"].num_parameters()


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "model_type,change,field",
    [
        ("qwen2", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling"),
        ("mistral", {"hidden_act": "gelu"}, "hidden_act"),
        ("gemma", {"attention_bias": True}, "attention_bias"),
        ("gemma2", {"hidden_activation": "gelu"}, "hidden_activation"),
        ("gemma2", {"use_bidirectional_attention": True}, "use_bidirectional_attention"),
        ("gemma2", {"layer_types": ["chunked_attention"] * 4}, "layer_types"),
        ("gemma3_text", {"attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
        (
            "gemma3_text",
            {"rope_parameters": GEMMA3_ROPE | {"full_attention": {"rope_type": "linear"}}},
            "full_attention.rope_type",
        ),
        ("gemma3_text", {"model_type": "gemma3"}, "model_type"),
        ("gemma3_text", {"architectures": ["Gemma2ForCausalLM"]}, "architectures"),
    ],
)
def test_unsupported_fields_are_refused_by_name(model_type, change, field):
    config_cls, _, fields, _ = FAMILIES[model_type]
    base = getattr(transformers, config_cls)(**COMMON, **fields).to_dict()
    hf.config_from_hf(base)  # the unchanged config imports
    with pytest.raises(hf.UnsupportedConfigError, match=field):
        hf.config_from_hf(base | change)


def test_export_refuses_a_family_that_cannot_hold_the_model():
    cfg, _ = hf.config_from_hf(hf_model("gemma2").config.to_dict())
    with pytest.raises(hf.UnsupportedConfigError, match=r"model\.sliding_window=5: a gemma "):
        hf.config_to_hf(cfg, model_type="gemma")
    cfg = cfg.replace(sliding_window=0, attention_pattern="", attn_scale_dim=0.0)
    cfg = cfg.replace(attn_logit_softcap=0.0, final_logit_softcap=0.0)  # all but post_norms
    assert hf.config_to_hf(cfg)["model_type"] == "gemma2"
    with pytest.raises(hf.UnsupportedConfigError, match=r"model\.post_norms=True"):
        hf.config_to_hf(cfg, model_type="gemma")
    mixed = ModelConfig(sliding_window=4, attention_pattern="lg")  # no bias: not Qwen2
    with pytest.raises(hf.UnsupportedConfigError, match=r"model\.attention_pattern='lg'"):
        hf.config_to_hf(mixed)


def test_checkpoint_metas_without_the_new_fields_read_as_before():
    """A meta written before these fields existed is a Llama-like model; a child may
    restate the defaults but not change a field that adds parameters."""
    new = {"qkv_bias", "sliding_window", "attention_pattern", "local_rope_theta"}
    new |= {"scale_embeddings", "norm_scale_offset", "attn_scale_dim", "attn_logit_softcap"}
    new |= {"final_logit_softcap", "post_norms", "qk_norm"}
    old = {k: v for k, v in ModelConfig(dtype="float32").to_dict().items() if k not in new}
    parent = Parent(pathlib.Path("old/checkpoints/3"), 3, {"model": old})
    child = child_model_dict(parent, {"qkv_bias": False, "sliding_window": 0})
    assert ModelConfig(**child) == ModelConfig(**old) == ModelConfig(dtype="float32")
    for key in ("qkv_bias", "post_norms", "qk_norm"):
        with pytest.raises(InitFromError, match=f"model.{key}=True"):
            child_model_dict(parent, {key: True})


@pytest.mark.parametrize("model_type", ["qwen2", "gemma3_text"])
def test_reward_model_exports_as_the_familys_classifier(tmp_path, model_type):
    cfg, _ = hf.config_from_hf(hf_model(model_type).config.to_dict(), dtype="float32")
    heads = {"lm_head": False, "scalar_head": True}
    model = Transformer(cfg, **heads)
    params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: x + rng.normal(0, 0.1, x.shape).astype(np.float32), params)
    meta = {"stage": "reward", "config": {}, "model": cfg.to_dict(), "heads": heads}
    checkpointer = Checkpointer(tmp_path / "rm", async_save=False)
    checkpointer.save(1, {"step": jnp.asarray(1), "params": params}, {}, meta | {"tokenizer": None})
    checkpointer.close()
    hf_cli.export_hf(tmp_path / "rm", tmp_path / "hf")
    hf_model_ = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf")
    assert type(hf_model_).__name__ == hf.FAMILIES[model_type].classifier
    tokens = rng.integers(4, 256, (2, 20))
    tokens[1, 14:] = COMMON["pad_token_id"]  # right padding: HF scores the last real token
    with torch.no_grad():
        theirs = hf_model_.eval()(torch.tensor(tokens)).logits[:, 0].numpy()
    out = model.apply({"params": params}, jnp.asarray(tokens), segment_ids=jnp.asarray(tokens != 0))
    ours = np.asarray(out.scalars)[[0, 1], [19, 13]] - float(params["scalar_bias"])
    assert np.abs(theirs - ours).max() <= TOLERANCE
