"""The fused CPU decode step (model/fused_decode.py, `FlaxlmLlamaDecode` in cpu_kernels.cc).

Reference: the model's own decode step (`generate.decode_step`, XLA ops, itself checked
against HF transformers in test_hf), on the same random weights, prompts and cache.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import cpu_kernels, fused_decode, quantize
from model import generate as gen
from model import sharding as sh
from model.config import get_preset
from model.transformer import Transformer, init_cache
from tests.test_generate import PROMPTS, init_params

pytestmark = pytest.mark.skipif(
    not cpu_kernels.available(), reason="no C++ compiler: the CPU kernels did not build"
)


def random_norms(params, seed: int = 1):
    """init_params sets norm scales to 1; random ones check the kernel applies them."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        if jax.tree_util.keystr(path).endswith("['scale']"):
            return jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape), leaf.dtype)
        return leaf

    return jax.tree_util.tree_map_with_path(draw, params)


@pytest.fixture(
    scope="module",
    params=[
        {},  # tiny: GQA 4/2, tied head
        {"tie_embeddings": False, "num_kv_heads": 1, "rope_theta": 500.0, "num_layers": 3},
        {"num_kv_heads": 4, "mlp_dim": 72, "head_dim": 12},  # widths off the 8-lane vectors
        {"scan_layers": False, "num_layers": 3},  # per-layer params, stacked for the kernel
    ],
    ids=["tiny", "untied-mqa", "odd-widths", "unrolled"],
)
def model_and_params(request):
    config = dataclasses.replace(get_preset("tiny"), **request.param)
    model = Transformer(config)
    return model, random_norms(init_params(model))


def test_fused_steps_match_the_model_step(model_and_params):
    model, params = model_and_params
    prompts = gen.left_pad(PROMPTS)
    batch, prompt_len = prompts.tokens.shape
    cache = init_cache(model.config, batch, prompt_len + 8)
    positions = gen.prompt_positions(prompts.segment_ids)
    _, cache = gen.prefill(model, params, prompts.tokens, prompts.segment_ids, positions, cache)
    lengths = jnp.sum(prompts.segment_ids, axis=1)
    xla_step = jax.jit(gen.decode_step, static_argnums=0)
    cpu_step = jax.jit(fused_decode.decode_step, static_argnums=0)
    fused_params = fused_decode.decode_params(model.config, params)
    reference, fused = cache, cache
    token = jnp.array([3, 200, 17, 9], jnp.int32)
    for i in range(5):
        slot = prompt_len + i
        want, reference = xla_step(model, params, reference, token, lengths + i, slot)
        got, fused = cpu_step(model, fused_params, fused, token, lengths + i, slot)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)
        for name in ("k", "v"):
            np.testing.assert_allclose(
                np.asarray(fused[name]), np.asarray(reference[name]), rtol=1e-4, atol=1e-5
            )
        np.testing.assert_array_equal(
            np.asarray(fused["segment_ids"]), np.asarray(reference["segment_ids"])
        )
        token = jnp.argmax(want, axis=-1).astype(jnp.int32)


def test_generate_with_the_fused_step_keeps_tokens_and_log_probs():
    model = Transformer(get_preset("tiny"))
    params = random_norms(init_params(model))
    prompts = gen.left_pad(PROMPTS)

    def run(decode_impl: str, sampling: gen.SamplingConfig):
        sampling = dataclasses.replace(sampling, decode_impl=decode_impl)
        return gen.generate(
            model,
            params,
            prompts.tokens,
            prompts.segment_ids,
            jax.random.key(3),
            max_new_tokens=12,
            sampling=sampling,
            eos_id=2,
            cache_step=4,  # grows the cache twice: the kernel sees three lengths
        )

    for sampling in (gen.SamplingConfig(temperature=0.0), gen.SamplingConfig(temperature=1.0)):
        fused, reference = run("cpu", sampling), run("xla", sampling)
        np.testing.assert_array_equal(np.asarray(fused.tokens), np.asarray(reference.tokens))
        np.testing.assert_array_equal(np.asarray(fused.mask), np.asarray(reference.mask))
        np.testing.assert_allclose(
            np.asarray(fused.log_probs), np.asarray(reference.log_probs), atol=1e-4
        )
        # The learner's recomputation (one forward pass) gives the same log-probs.
        recomputed = gen.completion_log_probs(
            model, params, prompts.tokens, prompts.segment_ids, fused, sampling.temperature or 1.0
        )
        np.testing.assert_allclose(np.asarray(recomputed), np.asarray(fused.log_probs), atol=1e-4)


@pytest.mark.parametrize(
    "change, named",
    [
        ({"qkv_bias": True}, "model.qkv_bias"),
        ({"dtype": "bfloat16"}, "model.dtype"),
        ({"activation": "gelu"}, "model.activation"),
        ({"norm": "layernorm"}, "model.norm"),
        ({"sliding_window": 4, "attention_pattern": "lg"}, "model.sliding_window"),
    ],
)
def test_an_unsupported_model_is_refused_by_name(change, named):
    model = Transformer(dataclasses.replace(get_preset("tiny"), **change))
    prompts = gen.left_pad(PROMPTS)
    with pytest.raises(ValueError, match=named):
        gen.generate(
            model,
            init_params(model),
            prompts.tokens,
            prompts.segment_ids,
            jax.random.key(0),
            max_new_tokens=2,
            sampling=gen.SamplingConfig(decode_impl="cpu"),
        )


def test_int8_weights_and_unknown_impls_are_refused():
    model = Transformer(get_preset("tiny"))
    params = init_params(model)
    prompts = gen.left_pad(PROMPTS)
    args = (model, None, prompts.tokens, prompts.segment_ids, jax.random.key(0))
    fused = gen.SamplingConfig(decode_impl="cpu")
    with pytest.raises(ValueError, match="int8 weights"):
        gen.generate(
            *args[:1], quantize.quantize_params(params), *args[2:], max_new_tokens=2, sampling=fused
        )
    with pytest.raises(ValueError, match="decode_impl='gpu'"):
        gen.SamplingConfig(decode_impl="gpu")
    if jax.device_count() > 1:  # tests/conftest.py fakes 8 CPU devices
        mesh = sh.make_mesh(data=-1, fsdp=1)
        with pytest.raises(ValueError, match=f"not a mesh of {jax.device_count()}"):
            gen.generate(
                *args[:1],
                params,
                *args[2:],
                max_new_tokens=2,
                sampling=fused,
                mesh=mesh,
                rules=sh.get_rules("fsdp"),
            )
