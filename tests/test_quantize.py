"""int8 weight-only decoding (model/quantize.py, model/cpu_kernels.{py,cc}).

References: numpy (the per-group quantization written out, float64 matmuls of the
dequantized weights) and the fp32 model run on the dequantized weights.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import cpu_kernels, quantize
from model import generate as gen
from model.config import get_preset
from model.transformer import Transformer
from tests.test_generate import PROMPTS, init_params

needs_kernel = pytest.mark.skipif(
    not cpu_kernels.available(), reason="no C++ compiler: the int8 kernel did not build"
)


def test_kernel_builds_on_this_machine():
    # .ci/run's machines have g++; a build failure there is a defect, not a skip.
    assert cpu_kernels.available(), "model/cpu_kernels.cc did not compile"


def np_quantize(w_rows: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows [out, in] -> codes, scales, minimums, one loop per group: of the two grids
    (256 levels from the group's min to its max, or symmetric, scale max|w| / 127 and
    minimum -128 scales), the one with the smaller largest error."""
    out, width = w_rows.shape
    codes = np.zeros_like(w_rows, np.uint8)
    scales = np.zeros((out, width // group), np.float32)
    lows = np.zeros((out, width // group), np.float32)
    for o in range(out):
        for g in range(width // group):
            cols = slice(g * group, (g + 1) * group)
            block = w_rows[o, cols]
            best = None
            for low, high in (
                (block.min(), block.max()),
                (-np.abs(block).max() * 128 / 127, np.abs(block).max()),
            ):
                scale = np.float32((high - low) / 255) if high > low else np.float32(1.0)
                code = np.clip(np.rint((block - np.float32(low)) / scale), 0, 255)
                error = np.abs(code * scale + np.float32(low) - block).max()
                if best is None or error < best[0]:
                    best = (error, code, scale, np.float32(low))
            _, codes[o, cols], scales[o, g], lows[o, g] = best
    return codes, scales, lows


def test_quantize_matches_numpy_and_stays_within_half_a_level():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(64, 48)).astype(np.float32)  # kernel [in=64, out=48]
    qw = quantize.quantize(w, (0,))
    codes, scales, lows = np_quantize(w.T, 32)
    assert qw.layout == "in_out" and qw.q.shape == w.shape  # the kernel's own layout
    np.testing.assert_array_equal(np.asarray(qw.q), codes.T)
    np.testing.assert_allclose(np.asarray(qw.scale), scales.T, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(qw.low), lows.T)
    error = np.abs(np.asarray(qw.dequantize()) - w)
    half_level = np.repeat(scales, 32, axis=1).T / 2
    assert (error <= half_level * (1 + 1e-5) + 1e-7).all()


def test_weights_from_q4_1_blocks_come_back_exactly():
    """A GGUF Q4_1 block is d * q + m with q in 0..15: 255 / 15 = 17 int8 levels per step."""
    rng = np.random.default_rng(1)
    d = rng.uniform(0.01, 0.1, (16, 4, 1)).astype(np.float32)
    m = rng.normal(size=(16, 4, 1)).astype(np.float32)
    q4 = rng.integers(0, 16, (16, 4, 32))
    q4[..., 0], q4[..., 1] = 0, 15  # each block spans the full 4-bit range
    rows = (d * q4 + m).reshape(16, 128)  # [out, in]
    qw = quantize.quantize(rows.T, (0,))
    np.testing.assert_allclose(np.asarray(qw.dequantize()), rows.T, rtol=0, atol=2e-6)


def test_weights_from_q8_0_blocks_come_back_exactly():
    """A GGUF Q8_0 block is d * q, q in -127..127 with 127 or -127 present."""
    rng = np.random.default_rng(5)
    d = rng.uniform(0.001, 0.01, (16, 4, 1)).astype(np.float32)
    q8 = rng.integers(-127, 128, (16, 4, 32))
    q8[..., 0] = np.where(rng.random((16, 4)) < 0.5, 127, -127)
    rows = (d * q8).reshape(16, 128)  # [out, in], the embedding's layout
    qw = quantize.quantize(rows, (1,))
    # A few fp32 ulps of |w| <= 1.27 (code * scale + low rounds); a wrong code is off by
    # a whole step d >= 1e-3.
    np.testing.assert_allclose(np.asarray(qw.dequantize()), rows, rtol=0, atol=1e-6)


@needs_kernel
@pytest.mark.parametrize(
    ("spec", "x_shape", "w_shape", "in_axes"),
    [
        ("BTD,DF->BTF", (2, 3, 64), (64, 40), (0,)),  # mlp up
        ("BTD,DNH->BTNH", (1, 1, 64), (64, 4, 16), (0,)),  # q
        ("BTNH,NHD->BTD", (3, 1, 4, 16), (4, 16, 64), (0, 1)),  # o
        ("BTD,DV->BTV", (2, 1, 48), (48, 300), (0,)),  # head, width not a multiple of 32
        ("BTD,VD->BTV", (2, 2, 64), (300, 64), (1,)),  # tied head: the embedding's layout
    ],
)
def test_kernel_projection_equals_numpy(spec, x_shape, w_shape, in_axes):
    rng = np.random.default_rng(2)
    x = rng.normal(size=x_shape).astype(np.float32)
    qw = quantize.quantize(rng.normal(size=w_shape).astype(np.float32), in_axes)
    reference = np.einsum(spec, x.astype(np.float64), np.asarray(qw.dequantize(), np.float64))
    out = jax.jit(lambda x: qw.project(spec, x))(x)
    assert out.shape == reference.shape
    np.testing.assert_allclose(np.asarray(out), reference, rtol=1e-5, atol=1e-4)


def test_projection_refuses_a_spec_its_layout_cannot_serve():
    qw = quantize.quantize(np.ones((8, 16), np.float32), (0,))
    with pytest.raises(ValueError, match="does not match"):
        qw.project("BF,DF->BD", jnp.ones((2, 16)))


def test_tied_embedding_rows_and_transpose():
    rng = np.random.default_rng(3)
    table = rng.normal(size=(50, 32)).astype(np.float32)  # [V, D], D the head's input
    qw = quantize.quantize(table, (1,))
    assert qw.layout == "out_in"
    codes, scales, lows = np_quantize(table, 32)
    np.testing.assert_array_equal(np.asarray(qw.q), codes)
    np.testing.assert_allclose(np.asarray(qw.scale), scales, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(qw.low), lows)
    dense = np.asarray(qw.dequantize())
    ids = jnp.array([[3, 0, 49]])
    np.testing.assert_allclose(np.asarray(qw.take(ids)), dense[np.asarray(ids)], atol=1e-6)
    np.testing.assert_allclose(np.asarray(qw.T.dequantize()), dense.T, atol=1e-6)
    assert qw.T.in_axes == (0,) and qw.T.shape == (32, 50)


@pytest.fixture(scope="module", params=[True, False], ids=["scan", "unrolled"])
def tiny_pair(request):
    """A tiny model, its int8 params, and the fp32 params those codes stand for."""
    config = dataclasses.replace(get_preset("tiny"), scan_layers=request.param)
    model = Transformer(config)
    params8 = quantize.quantize_params(init_params(model))
    return model, params8, quantize.dequantize_params(params8)


def test_quantize_params_quantizes_every_projection_and_only_those(tiny_pair):
    model, params8, _ = tiny_pair
    paths = {
        jax.tree_util.keystr(path): leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(
            params8, is_leaf=lambda x: isinstance(x, quantize.QuantizedWeight)
        )
    }
    int8 = sorted(p for p, leaf in paths.items() if isinstance(leaf, quantize.QuantizedWeight))
    names = {p.rsplit("['", 1)[1].rstrip("']") for p in int8}
    assert names == {"q", "k", "v", "o", "up", "gate", "down", "embedding"}
    blocks = 1 if model.config.scan_layers else model.config.num_layers  # scan: one stack
    assert len(int8) == 1 + 7 * blocks
    assert all("scale" in p.rsplit("['", 1)[1] for p in paths if p not in int8)


@needs_kernel
def test_int8_logits_equal_the_fp32_model_on_the_same_grid(tiny_pair):
    model, params8, params32 = tiny_pair
    tokens = jnp.array([[5, 17, 3, 99, 42, 7]])
    positions = jnp.arange(6)[None]

    def logits(params):
        return model.apply({"params": params}, tokens, positions).logits

    np.testing.assert_allclose(
        np.asarray(jax.jit(logits)(params8)), np.asarray(logits(params32)), rtol=1e-4, atol=1e-4
    )


@needs_kernel
def test_int8_generation_keeps_greedy_tokens_and_log_probs(tiny_pair):
    model, params8, params32 = tiny_pair
    prompts = gen.left_pad(PROMPTS)

    def run(params):
        return gen.generate(
            model,
            params,
            prompts.tokens,
            prompts.segment_ids,
            jax.random.key(0),
            max_new_tokens=6,
            sampling=gen.SamplingConfig(temperature=0.0),
        )

    fast, reference = run(params8), run(params32)
    np.testing.assert_array_equal(np.asarray(fast.tokens), np.asarray(reference.tokens))
    np.testing.assert_allclose(
        np.asarray(fast.log_probs), np.asarray(reference.log_probs), atol=1e-4
    )


def test_without_the_kernel_the_xla_path_gives_the_same_projection(monkeypatch):
    rng = np.random.default_rng(4)
    qw = quantize.quantize(rng.normal(size=(64, 24)).astype(np.float32), (0,))
    x = rng.normal(size=(2, 64)).astype(np.float32)
    monkeypatch.setattr(cpu_kernels, "available", lambda: False)
    out = qw.project("BD,DF->BF", x)
    np.testing.assert_allclose(np.asarray(out), x @ np.asarray(qw.dequantize()), atol=1e-4)


def test_missing_compiler_is_named(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", "no-such-compiler")
    monkeypatch.setenv("FLAXLM_KERNEL_CACHE", str(tmp_path))
    with pytest.raises(cpu_kernels.KernelBuildError, match="no-such-compiler"):
        cpu_kernels.build()
