"""Transformer numerics: causality, packing, numpy reference, GQA, scan/remat equivalence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from model import hf
from model.config import PRESETS, ModelConfig, flops_per_token, get_preset, param_count
from model.layers import Attention, LayerNorm, apply_rope, project
from model.transformer import Transformer, unstack_layers
from tests import reference

TINY = get_preset("tiny")


def init(cfg: ModelConfig, seq_len: int = 16, seed: int = 0, **kwargs):
    model = Transformer(cfg, **kwargs)
    params = nn.unbox(model.init(jax.random.key(seed), jnp.zeros((1, seq_len), jnp.int32)))
    return model, params["params"]


def logits(model, params, tokens, **kwargs):
    apply = jax.jit(lambda p, t, kw: model.apply({"params": p}, t, **kw).logits)
    return np.asarray(apply(params, jnp.asarray(tokens), kwargs))


def test_changing_token_t_changes_no_earlier_logit():
    model, params = init(TINY)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, TINY.vocab_size, (2, 16))
    base = logits(model, params, tokens)
    for t in (0, 5, 15):
        changed = tokens.copy()
        changed[:, t] = (changed[:, t] + 1) % TINY.vocab_size
        out = logits(model, params, changed)
        np.testing.assert_array_equal(out[:, :t], base[:, :t])
        assert np.abs(out[:, t:] - base[:, t:]).max() > 1e-3  # the change is visible


def test_packed_documents_equal_each_document_alone():
    model, params = init(TINY)
    rng = np.random.default_rng(1)
    doc_a, doc_b = rng.integers(0, 256, 7), rng.integers(0, 256, 5)
    packed = np.concatenate([doc_a, doc_b, [0, 0, 0, 0]])[None]
    segment_ids = np.array([[1] * 7 + [2] * 5 + [0] * 4])
    positions = np.array([list(range(7)) + list(range(5)) + [0] * 4])
    out = logits(
        model,
        params,
        packed,
        positions=jnp.asarray(positions),
        segment_ids=jnp.asarray(segment_ids),
    )
    alone_a = logits(model, params, doc_a[None])
    alone_b = logits(model, params, doc_b[None])
    np.testing.assert_allclose(out[0, :7], alone_a[0], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(out[0, 7:12], alone_b[0], atol=1e-5, rtol=1e-5)
    assert np.isfinite(out).all()  # pad rows see no key but stay finite


@pytest.mark.parametrize("kv_heads", [1, 2, 4])  # MQA, GQA (heads/2), MHA
def test_attention_matches_numpy_reference(kv_heads):
    n, h, d, t_len = 4, 8, 16, 9
    layer = Attention(
        num_heads=n, num_kv_heads=kv_heads, head_dim=h, num_layers=2, rope_theta=500.0
    )
    rng = np.random.default_rng(kv_heads)
    x = rng.normal(size=(2, t_len, d)).astype(np.float32)
    positions = np.array([list(range(t_len)), [0, 1, 2, 3, 0, 1, 2, 0, 0]])
    segments = np.array([[1] * t_len, [1, 1, 1, 1, 2, 2, 2, 0, 0]])
    mask = (segments[:, :, None] == segments[:, None, :]) & (segments[:, None, :] != 0)
    mask &= np.tril(np.ones((t_len, t_len), bool))[None]
    params = nn.unbox(layer.init(jax.random.key(0), x, positions, mask))["params"]
    params = jax.tree.map(lambda p: np.asarray(p) + rng.normal(size=p.shape) * 0.3, params)
    params = jax.tree.map(lambda p: p.astype(np.float32), params)
    out, _ = layer.apply(
        {"params": params}, jnp.asarray(x), jnp.asarray(positions), jnp.asarray(mask)
    )
    for b in range(2):
        expected = reference.attention(
            x[b],
            params["q"],
            params["k"],
            params["v"],
            params["o"],
            positions[b],
            segments[b],
            500.0,
        )
        live = segments[b] != 0
        np.testing.assert_allclose(np.asarray(out[b])[live], expected[live], atol=1e-4, rtol=1e-4)


def test_rope_matches_numpy_and_preserves_norm():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(1, 6, 2, 8)).astype(np.float32)
    positions = np.array([[0, 1, 2, 7, 100, 3]])
    out = np.asarray(apply_rope(jnp.asarray(x), jnp.asarray(positions), 10_000.0))
    for head in range(2):
        expected = reference.rope(x[0, :, head], positions[0], 10_000.0)
        np.testing.assert_allclose(out[0, :, head], expected, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)


@pytest.mark.parametrize("tie", [True, False])
def test_full_forward_matches_numpy_reference(tie):
    cfg = TINY.replace(tie_embeddings=tie)
    model, params = init(cfg, seed=4)
    rng = np.random.default_rng(4)
    tokens = rng.integers(0, cfg.vocab_size, 10)
    out = logits(model, params, tokens[None])[0]
    flat = jax.tree.map(np.asarray, unstack_layers(params, cfg.num_layers))
    expected = reference.transformer_logits(flat, cfg, tokens, np.arange(10), np.ones(10, int))
    np.testing.assert_allclose(out, expected, atol=1e-4, rtol=1e-4)


def test_scan_on_and_off_give_identical_outputs():
    model, params = init(TINY, seed=5)
    unscanned = Transformer(TINY.replace(scan_layers=False))
    tokens = np.random.default_rng(5).integers(0, 256, (2, 12))
    a = logits(model, params, tokens)
    b = logits(unscanned, unstack_layers(params, TINY.num_layers), tokens)
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)  # same math, other fusion


@pytest.mark.parametrize("policy", ["full", "dots_saveable", "dots_with_no_batch_dims_saveable"])
@pytest.mark.parametrize("scan", [True, False])
def test_remat_changes_no_gradient(policy, scan):
    cfg = TINY.replace(scan_layers=scan)
    model, params = init(cfg, seed=6)
    remat_model = Transformer(cfg.replace(remat_policy=policy))
    tokens = jnp.asarray(np.random.default_rng(6).integers(0, 256, (2, 12)))

    def loss(m):
        return lambda p: jnp.mean(m.apply({"params": p}, tokens).logits ** 2)

    g_plain = jax.jit(jax.grad(loss(model)))(params)
    g_remat = jax.jit(jax.grad(loss(remat_model)))(params)
    for a, b in zip(jax.tree.leaves(g_plain), jax.tree.leaves(g_remat), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)


def test_dots_saveable_recomputes_no_matmul():
    """The projections run in a custom_vjp, out of sight of the dot policies: they must
    still be saved, so the backward holds exactly the matmuls it holds without remat."""
    tokens = jnp.asarray(np.random.default_rng(6).integers(0, 256, (2, 12)))

    def matmuls_in_grad(policy):
        cfg = TINY.replace(scan_layers=False, remat_policy=policy)
        model, params = init(cfg, seed=6)
        loss = lambda p: jnp.mean(model.apply({"params": p}, tokens).logits ** 2)  # noqa: E731
        return str(jax.make_jaxpr(jax.grad(loss))(params)).count("dot_general")

    plain = matmuls_in_grad("none")
    assert matmuls_in_grad("dots_saveable") == plain
    # Attention's two batched dots per layer are recomputed; the projections are not.
    assert matmuls_in_grad("dots_with_no_batch_dims_saveable") == plain + 2 * TINY.num_layers
    assert matmuls_in_grad("full") > plain + 2 * TINY.num_layers


def test_scalar_head_small_init_and_shape():
    model, params = init(TINY, lm_head=False, scalar_head=True)
    assert "scalar_head" in params and "lm_head" not in params
    std = float(np.std(params["scalar_head"]))
    assert 0.5 / np.sqrt(TINY.d_model + 1) < std < 1.5 / np.sqrt(TINY.d_model + 1)
    out = jax.jit(model.apply)({"params": params}, jnp.zeros((3, 5), jnp.int32))
    assert out.logits is None and out.scalars.shape == (3, 5)


# Checkpoints and the HF/GGUF converters address parameters by these paths: a refactor of
# the model must leave them, their shapes and their logical axes exactly as they are.
PARAM_TREE = {
    "['embedding']": ((256, 64), ("vocab", "embed")),
    "['final_norm']['bias']": ((64,), ("norm",)),
    "['final_norm']['scale']": ((64,), ("norm",)),
    "['layers']['attn']['k']": ((2, 64, 2, 16), ("layers", "embed", "kv_heads", "head_dim")),
    "['layers']['attn']['o']": ((2, 4, 16, 64), ("layers", "heads", "head_dim", "embed")),
    "['layers']['attn']['q']": ((2, 64, 4, 16), ("layers", "embed", "heads", "head_dim")),
    "['layers']['attn']['v']": ((2, 64, 2, 16), ("layers", "embed", "kv_heads", "head_dim")),
    "['layers']['attn_norm']['bias']": ((2, 64), ("layers", "norm")),
    "['layers']['attn_norm']['scale']": ((2, 64), ("layers", "norm")),
    "['layers']['mlp']['down']": ((2, 128, 64), ("layers", "mlp", "embed")),
    "['layers']['mlp']['gate']": ((2, 64, 128), ("layers", "embed", "mlp")),
    "['layers']['mlp']['up']": ((2, 64, 128), ("layers", "embed", "mlp")),
    "['layers']['mlp_norm']['bias']": ((2, 64), ("layers", "norm")),
    "['layers']['mlp_norm']['scale']": ((2, 64), ("layers", "norm")),
    "['lm_head']": ((64, 256), ("embed", "vocab")),
    "['position_embedding']": ((128, 64), ("position", "embed")),
    "['scalar_bias']": ((), ()),
    "['scalar_head']": ((64,), ("embed",)),
}


def test_param_tree_paths_shapes_and_axes_are_fixed():
    cfg = TINY.replace(position="learned", tie_embeddings=False, norm="layernorm")
    model = Transformer(cfg, lm_head=True, scalar_head=True)
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
    leaves = jax.tree_util.tree_flatten_with_path(
        boxed["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned)
    )[0]
    tree = {
        jax.tree_util.keystr(path): (tuple(leaf.value.shape), tuple(leaf.names))
        for path, leaf in leaves
    }
    assert tree == PARAM_TREE
    unscanned = Transformer(TINY.replace(scan_layers=False))
    shapes = jax.eval_shape(lambda: unscanned.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
    assert sorted(nn.unbox(shapes)["params"]) == ["embedding", "final_norm", "layers_0", "layers_1"]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_param_count_matches_initialized_model(name):
    cfg = PRESETS[name]
    shapes = jax.eval_shape(
        lambda: Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    )
    actual = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(shapes)))
    assert actual == param_count(cfg)


def test_param_count_of_7b_is_llama2_7b():
    assert param_count(PRESETS["7b"]) == 6_738_415_616  # Llama-2-7B's published count


def test_flops_per_token_by_hand():
    cfg = TINY  # D=64, L=2, N=4, K=2, H=16, F=128, V=256, swiglu
    per_layer = 64 * 16 * (4 + 4 + 2 + 2) + 3 * 64 * 128
    expected = 6 * (2 * per_layer + 256 * 64) + 12 * 2 * 4 * 16 * 32
    assert flops_per_token(cfg, 32) == expected


@pytest.mark.parametrize(
    "change, key",
    [
        ({"num_kv_heads": 3}, "num_kv_heads"),
        ({"activation": "relu"}, "activation"),
        ({"head_dim": 7}, "head_dim"),
        ({"remat_policy": "some"}, "remat_policy"),
        ({"d_model": 0}, "d_model"),
        ({"dtype": "int8"}, "dtype"),
        ({"norm": "batchnorm"}, "norm"),
        ({"position": "alibi"}, "position"),
    ],
)
def test_bad_config_names_the_key(change, key):
    with pytest.raises(ValueError, match=f"model.{key}"):
        TINY.replace(**change)


def test_unknown_preset_and_key_are_named():
    with pytest.raises(ValueError, match=r"model\.preset='huge'"):
        get_preset("huge")
    with pytest.raises(ValueError, match="num_experts"):
        TINY.replace(num_experts=8)


# ----------------------------------------------------------------------------- norm / position


def test_layernorm_matches_numpy_reference():
    rng = np.random.default_rng(7)
    x = (rng.normal(size=(2, 5, 16)) * 3 + 1.5).astype(np.float32)  # non-zero mean
    layer = LayerNorm(eps=1e-5)
    params = {
        "scale": rng.normal(1.0, 0.3, 16).astype(np.float32),
        "bias": rng.normal(0.0, 0.3, 16).astype(np.float32),
    }
    out = np.asarray(layer.apply({"params": params}, jnp.asarray(x)))
    x64 = x.astype(np.float64)
    mean, var = x64.mean(-1, keepdims=True), x64.var(-1, keepdims=True)
    expected = (x64 - mean) / np.sqrt(var + 1e-5) * params["scale"] + params["bias"]
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5)
    init = nn.unbox(layer.init(jax.random.key(0), jnp.asarray(x)))["params"]
    np.testing.assert_array_equal(init["scale"], 1.0)
    np.testing.assert_array_equal(init["bias"], 0.0)


@pytest.mark.parametrize("norm, position", [("layernorm", "rope"), ("rmsnorm", "learned")])
def test_packed_documents_equal_each_alone_for_norm_and_position(norm, position):
    cfg = TINY.replace(norm=norm, position=position)
    model, params = init(cfg, seed=8)
    rng = np.random.default_rng(8)
    doc_a, doc_b = rng.integers(0, 256, 7), rng.integers(0, 256, 5)
    packed = np.concatenate([doc_a, doc_b, [0, 0, 0, 0]])[None]
    segment_ids = jnp.asarray([[1] * 7 + [2] * 5 + [0] * 4])
    positions = jnp.asarray([list(range(7)) + list(range(5)) + [0] * 4])
    out = logits(model, params, packed, positions=positions, segment_ids=segment_ids)
    np.testing.assert_allclose(out[0, :7], logits(model, params, doc_a[None])[0], atol=1e-5)
    np.testing.assert_allclose(out[0, 7:12], logits(model, params, doc_b[None])[0], atol=1e-5)


@pytest.mark.parametrize("position", ["learned", "none"])
def test_positions_are_read_by_learned_and_ignored_by_nope(position):
    model, params = init(TINY.replace(position=position), seed=9)
    tokens = np.random.default_rng(9).integers(0, 256, (1, 8))
    base = logits(model, params, tokens)
    shifted = logits(model, params, tokens, positions=jnp.arange(8)[None] + 3)
    if position == "learned":
        assert np.abs(shifted - base).max() > 1e-3
        assert "position_embedding" in params
    else:
        np.testing.assert_array_equal(shifted, base)
        assert "position_embedding" not in params
    # Causal either way: a later token changes no earlier logit.
    changed = tokens.copy()
    changed[0, 5] = (changed[0, 5] + 1) % 256
    np.testing.assert_array_equal(logits(model, params, changed)[:, :5], base[:, :5])


@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm"])
@pytest.mark.parametrize("position", ["rope", "learned", "none"])
@pytest.mark.parametrize("tie", [True, False])
def test_param_count_matches_for_norm_and_position(norm, position, tie):
    cfg = TINY.replace(norm=norm, position=position, tie_embeddings=tie)
    shapes = jax.eval_shape(
        lambda: Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    )
    actual = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(shapes)))
    assert actual == param_count(cfg)
    # Neither option adds a matmul, so the FLOP count is unchanged.
    assert flops_per_token(cfg, 32) == flops_per_token(TINY.replace(tie_embeddings=tie), 32)


@pytest.mark.parametrize(
    "change, key", [({"norm": "layernorm"}, "norm"), ({"position": "none"}, "position")]
)
def test_hf_export_refuses_layernorm_and_non_rope(change, key):
    with pytest.raises(hf.UnsupportedConfigError, match=f"model.{key}="):
        hf.config_to_hf(TINY.replace(**change))


@pytest.mark.parametrize(
    "spec, x_shape, w_shape, dtype, out_dtype",
    [
        ("BTD,DF->BTF", (2, 5, 4), (4, 12), jnp.float32, None),  # x narrower than out
        ("BTF,FD->BTD", (2, 5, 12), (12, 4), jnp.float32, None),  # out narrower: barrier path
        ("BTD,DNH->BTNH", (2, 5, 6), (6, 3, 4), jnp.float32, None),
        ("BTNH,NHD->BTD", (2, 5, 3, 4), (3, 4, 6), jnp.float32, None),
        ("BTD,DV->BTV", (2, 5, 4), (4, 9), jnp.bfloat16, jnp.float32),  # the lm head
    ],
)
def test_project_gradients_match_numpy(spec, x_shape, w_shape, dtype, out_dtype):
    """project's hand-written backward against numpy: dx = g·wᵀ, dw = xᵀ·g over tokens."""
    rng = np.random.default_rng(0)
    x, w = rng.normal(size=x_shape), rng.normal(size=w_shape)
    out_shape = np.einsum(spec, x, w).shape
    cotangent = rng.normal(size=out_shape)
    x_axes, rest = spec.split(",")
    w_axes, out_axes = rest.split("->")

    def loss(x, w):
        y = project(spec, x, w, out_dtype)
        return jnp.sum(y.astype(jnp.float32) * cotangent)

    dx, dw = jax.grad(loss, argnums=(0, 1))(jnp.asarray(x, dtype), jnp.asarray(w, dtype))
    assert dx.dtype == dtype and dw.dtype == dtype
    x, w = (np.asarray(jnp.asarray(a, dtype).astype(jnp.float32)) for a in (x, w))
    tol = 1e-5 if dtype == jnp.float32 else 3e-2
    np.testing.assert_allclose(
        dx.astype(np.float32),
        np.einsum(f"{out_axes},{w_axes}->{x_axes}", cotangent, w),
        rtol=tol,
        atol=tol * 4,
    )
    np.testing.assert_allclose(
        dw.astype(np.float32),
        np.einsum(f"{x_axes},{out_axes}->{w_axes}", x, cotangent),
        rtol=tol,
        atol=tol * 4,
    )
