"""Generation: KV-cache numerics, greedy and sampled decoding, log-probs, sharded decode.

References are independent of model/generate.py where they can be: full forward passes
without a cache, numpy softmax / top-p, and a chi-square test against softmax(logits / T).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from scipy import stats

from model import generate as gen
from model import sharding as sh
from model.config import PRESETS, get_preset
from model.transformer import CACHE_AXES, Transformer, init_cache
from train.state import param_shardings

# Left-padded to P = 5; every test uses batch 4 and P + NEW = 11 so compilations are shared.
PROMPTS = [[5, 17, 3, 99, 42], [7, 8], [250, 1, 2, 3], [9]]
NEW = 6


def abstract_params(model: Transformer):
    tokens = jnp.zeros((1, 8), jnp.int32)
    return nn.unbox(jax.eval_shape(model.init, jax.random.key(0), tokens)["params"])


def init_params(model: Transformer, seed: int = 0):
    """Random weights drawn in numpy: same role as model.init, without compiling it."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        if jax.tree_util.keystr(path).endswith("['scale']"):  # norm scales
            return jnp.ones(leaf.shape, leaf.dtype)
        return jnp.asarray(rng.normal(0.0, 0.1, leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, abstract_params(model))


@pytest.fixture(scope="module")
def tiny():
    model = Transformer(get_preset("tiny"))
    return model, init_params(model)


@functools.partial(jax.jit, static_argnums=0)
def _forward(model, params, tokens, segment_ids, positions):
    return model.apply({"params": params}, tokens, positions, segment_ids).logits


def full_logits(model, params, tokens, segment_ids, positions) -> np.ndarray:
    """Logits [B, T, V] of one forward pass without a cache."""
    return np.asarray(_forward(model, params, tokens, segment_ids, positions), np.float64)


def np_log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def joined(prompts: gen.Prompts, completion: np.ndarray, mask: np.ndarray | None = None):
    """Prompt + completion as one left-padded sequence: (tokens, segment_ids, positions)."""
    mask = np.broadcast_to(True if mask is None else mask, completion.shape)
    tokens = np.concatenate([prompts.tokens, completion], axis=1)
    segments = np.concatenate([prompts.segment_ids, mask.astype(np.int32)], axis=1)
    positions = np.maximum(np.cumsum(segments != 0, axis=1) - 1, 0)
    return tokens, segments, positions


# ----------------------------------------------------------------------------- prompts


def test_left_pad_layout():
    p = gen.left_pad([[4, 5, 6], [7]], pad_id=0, length=4)
    np.testing.assert_array_equal(p.tokens, [[0, 4, 5, 6], [0, 0, 0, 7]])
    np.testing.assert_array_equal(p.segment_ids, [[0, 1, 1, 1], [0, 0, 0, 1]])
    np.testing.assert_array_equal(p.positions[:, -1], [2, 0])
    np.testing.assert_array_equal(p.positions[0, 1:], [0, 1, 2])
    with pytest.raises(ValueError, match="empty prompt"):
        gen.left_pad([[1], []])
    with pytest.raises(ValueError, match="more than length"):
        gen.left_pad([[1, 2, 3]], length=2)
    with pytest.raises(ValueError, match="top_p"):
        gen.SamplingConfig(top_p=0.0)


def test_generate_rejects_bad_inputs(tiny):
    model, params = tiny
    prompts = gen.left_pad(PROMPTS)
    key = jax.random.key(0)
    right_padded = prompts.segment_ids[:, ::-1]
    with pytest.raises(ValueError, match="left-padded"):
        gen.generate(model, params, prompts.tokens, right_padded, key, max_new_tokens=2)
    with pytest.raises(ValueError, match="max_seq_len"):
        gen.generate(model, params, *prompts[:2], key, max_new_tokens=model.config.max_seq_len)


# ----------------------------------------------------------------------------- KV cache


def cached_forced_logits(model, params, prompts, forced) -> np.ndarray:
    """Logits [B, NEW, V] of prefill then one decode step per forced token (teacher
    forcing through the KV cache)."""
    batch, plen = prompts.tokens.shape
    cache = init_cache(model.config, batch, plen + NEW)
    logits, cache = jax.jit(gen.prefill, static_argnums=0)(model, params, *prompts, cache)
    stepwise = [logits]
    lengths = prompts.segment_ids.sum(axis=1)
    step = jax.jit(gen.decode_step, static_argnums=0)
    for i in range(NEW - 1):
        logits, cache = step(model, params, cache, forced[:, i], lengths + i, plen + i)
        stepwise.append(logits)
    return np.stack([np.asarray(x) for x in stepwise], axis=1)


@pytest.mark.parametrize(
    "num_kv_heads, scan_layers", [(4, True), (2, True), (1, False)], ids=["mha", "gqa", "mqa"]
)
def test_cached_logits_equal_full_forward(num_kv_heads: int, scan_layers: bool):
    model = Transformer(get_preset("tiny", num_kv_heads=num_kv_heads, scan_layers=scan_layers))
    params = init_params(model, seed=num_kv_heads)
    prompts = gen.left_pad(PROMPTS)
    forced = np.random.default_rng(0).integers(1, 256, (len(PROMPTS), NEW)).astype(np.int32)
    batch, plen = prompts.tokens.shape

    stepwise = cached_forced_logits(model, params, prompts, forced)  # [B, NEW, V]

    reference = full_logits(model, params, *joined(prompts, forced))[:, plen - 1 : -1]
    np.testing.assert_allclose(stepwise, reference, atol=1e-5, rtol=1e-5)

    # Left padding is invisible: the same sequences right-padded instead (start at slot 0).
    seqs = [np.concatenate([p, f]) for p, f in zip(PROMPTS, forced, strict=True)]
    right = np.zeros((batch, plen + NEW), np.int32)
    for row, seq in enumerate(seqs):
        right[row, : seq.size] = seq
    segments = (np.arange(plen + NEW)[None] < np.array([s.size for s in seqs])[:, None]).astype(
        np.int32
    )
    unpadded = full_logits(
        model, params, right, segments, np.broadcast_to(np.arange(plen + NEW), right.shape)
    )
    for row, prompt in enumerate(PROMPTS):
        np.testing.assert_allclose(
            stepwise[row],
            unpadded[row, len(prompt) - 1 : len(prompt) - 1 + NEW],
            atol=1e-5,
            rtol=1e-5,
        )


def test_prefill_over_its_own_keys_equals_the_buffer_read():
    """A prefill (cache_index the int 0) attends over the prompt's own keys; with a traced
    index the same call reads the whole buffer. Same logits and live cache slots, global
    and sliding-window layers alike, with left padding."""
    cfg = get_preset("tiny", sliding_window=3, attention_pattern="lg", scan_layers=False)
    model = Transformer(cfg)
    params = init_params(model, seed=3)
    prompts = gen.left_pad(PROMPTS)
    batch, plen = prompts.tokens.shape

    @functools.partial(jax.jit, static_argnums=0)
    def prefill(index, params):
        cache = init_cache(cfg, batch, plen + NEW, jnp.float32)
        args = (prompts.tokens, prompts.positions, prompts.segment_ids)
        out = model.apply({"params": params}, *args, cache=cache, cache_index=index())
        return out.logits, out.cache

    own_logits, own = prefill(lambda: 0, params)
    buffer_logits, buffer = prefill(lambda: jnp.int32(0), params)
    live = np.asarray(prompts.segment_ids, bool)
    np.testing.assert_allclose(
        np.asarray(own_logits)[live], np.asarray(buffer_logits)[live], atol=1e-5
    )
    np.testing.assert_array_equal(np.asarray(own["segment_ids"]), np.asarray(buffer["segment_ids"]))
    for name in "kv":  # [L, B, K, S, H]; pad slots are never read
        own_kv, buffer_kv = (
            np.asarray(c[name]).transpose(1, 3, 0, 2, 4)[:, :plen] for c in (own, buffer)
        )
        np.testing.assert_allclose(own_kv[live], buffer_kv[live], atol=1e-5)


# ----------------------------------------------------------------------------- decoding


def test_cache_sizes_double_the_room_for_new_tokens():
    assert gen.cache_sizes(64, 256, 64) == (128, 192, 320)
    assert gen.cache_sizes(5, 6, 2) == (7, 9, 11)
    assert gen.cache_sizes(3, 8, 4) == (7, 11)
    assert gen.cache_sizes(3, 4, 64) == (7,)  # N <= cache_step: one fixed cache
    assert gen.cache_sizes(3, 4, 4) == (7,)
    with pytest.raises(ValueError, match="cache_step=0"):
        gen.cache_sizes(3, 4, 0)


def test_grow_cache_keeps_the_slots_and_adds_empty_ones(tiny):
    model, _ = tiny
    cache = init_cache(model.config, 2, 5)
    cache = jax.tree.map(lambda x: x + 1, cache)
    grown = gen.grow_cache(cache, 8)
    for name, buffer in grown.items():
        slots = CACHE_AXES[name].index(sh.CACHE_LENGTH)
        assert buffer.shape[slots] == 8
        np.testing.assert_array_equal(jax.lax.slice_in_dim(buffer, 0, 5, axis=slots), 1)
        np.testing.assert_array_equal(jax.lax.slice_in_dim(buffer, 5, 8, axis=slots), 0)


# cache_step 2 with NEW = 6: the cache grows twice (7 -> 9 -> 11 slots) during the loop.
@pytest.mark.parametrize("cache_step", [gen.CACHE_STEP, 2])
def test_greedy_equals_argmax_of_repeated_full_forward(tiny, cache_step: int):
    model, params = tiny
    prompts = gen.left_pad(PROMPTS)
    out = gen.generate(
        model,
        params,
        prompts.tokens,
        prompts.segment_ids,
        jax.random.key(0),
        max_new_tokens=NEW,
        sampling=gen.SamplingConfig(temperature=0.0),
        cache_step=cache_step,
    )
    # Reference: a full forward pass over prompt + tokens so far for every new token. The
    # not-yet-generated tail is right padding (segment 0), which causality makes inert.
    plen = prompts.tokens.shape[1]
    completion = np.zeros((len(PROMPTS), NEW), np.int32)
    expected_lp = []
    for i in range(NEW):
        so_far = np.arange(NEW)[None] < i
        logits = full_logits(model, params, *joined(prompts, completion, so_far))[:, plen - 1 + i]
        completion[:, i] = logits.argmax(axis=-1)
        expected_lp.append(np_log_softmax(logits)[np.arange(len(PROMPTS)), completion[:, i]])
    np.testing.assert_array_equal(np.asarray(out.tokens), completion)
    np.testing.assert_array_equal(np.asarray(out.mask), True)
    np.testing.assert_allclose(np.asarray(out.log_probs), np.stack(expected_lp, 1), atol=1e-5)


def test_top_k_1_equals_greedy(tiny):
    model, params = tiny
    prompts = gen.left_pad(PROMPTS)
    args = (model, params, prompts.tokens, prompts.segment_ids, jax.random.key(3))
    greedy = gen.generate(*args, max_new_tokens=NEW, sampling=gen.SamplingConfig(temperature=0.0))
    top1 = gen.generate(*args, max_new_tokens=NEW, sampling=gen.SamplingConfig(1.3, top_k=1))
    np.testing.assert_array_equal(np.asarray(top1.tokens), np.asarray(greedy.tokens))
    # And on raw logits with many rows.
    logits = jax.random.normal(jax.random.key(1), (64, 50))
    tokens, _ = gen.sample_logits(jax.random.key(2), logits, gen.SamplingConfig(0.7, top_k=1))
    np.testing.assert_array_equal(np.asarray(tokens), np.asarray(logits).argmax(-1))


def np_top_p_keep(logits: np.ndarray, p: float) -> np.ndarray:
    """Boolean keep-mask: most likely tokens, added one at a time until their mass >= p."""
    keep = np.zeros(logits.shape, bool)
    for r, row in enumerate(logits):
        probs = np.exp(row - row.max())
        probs /= probs.sum()
        mass = 0.0
        for idx in np.argsort(-probs, kind="stable"):
            keep[r, idx] = True
            mass += probs[idx]
            if mass >= p:
                break
    return keep


@pytest.mark.parametrize("p", [0.05, 0.3, 0.6, 0.9, 0.99])
def test_top_p_filter_matches_numpy(p: float):
    logits = np.random.default_rng(1).normal(0.0, 2.0, (32, 40)).astype(np.float32)
    got = np.isfinite(np.asarray(gen.top_p_filter(jnp.asarray(logits), p)))
    np.testing.assert_array_equal(got, np_top_p_keep(logits, p))
    kept = np.asarray(gen.top_p_filter(jnp.asarray(logits), p))
    np.testing.assert_array_equal(kept[got], logits[got])  # survivors keep their logits


def test_top_k_filter_matches_numpy():
    logits = np.random.default_rng(2).normal(size=(16, 30)).astype(np.float32)
    got = np.isfinite(np.asarray(gen.top_k_filter(jnp.asarray(logits), 5)))
    expected = np.zeros_like(got)
    np.put_along_axis(expected, np.argsort(-logits, axis=1)[:, :5], True, axis=1)
    np.testing.assert_array_equal(got, expected)


def chi_square_pvalue(tokens: np.ndarray, probs: np.ndarray) -> float:
    counts = np.bincount(tokens, minlength=probs.size)
    assert counts[probs == 0].sum() == 0, "sampled a token the filters removed"
    support = probs > 0
    return stats.chisquare(counts[support], probs[support] * tokens.size).pvalue


@pytest.mark.parametrize(
    "sampling",
    [
        gen.SamplingConfig(temperature=1.0),
        gen.SamplingConfig(temperature=0.5),
        gen.SamplingConfig(temperature=2.0),
        gen.SamplingConfig(temperature=0.8, top_k=5, top_p=0.8),
    ],
    ids=["T1", "T0.5", "T2", "T0.8-k5-p0.8"],
)
def test_temperature_sampling_chi_square(sampling: gen.SamplingConfig):
    logits = np.array([1.5, 0.2, -0.3, 0.9, -1.0, 0.0, 2.0, -2.0], np.float32)
    draws = 40_000
    batch = jnp.broadcast_to(jnp.asarray(logits), (draws, logits.size))
    tokens, log_probs = gen.sample_logits(jax.random.key(7), batch, sampling)
    tokens = np.asarray(tokens)

    scaled = logits.astype(np.float64) / sampling.temperature
    keep = np.ones(logits.size, bool)
    if sampling.top_k:
        keep &= scaled >= np.sort(scaled)[-sampling.top_k]
    keep &= np_top_p_keep(np.where(keep, scaled, -np.inf)[None], sampling.top_p)[0]
    probs = np.where(keep, np.exp(scaled - scaled.max()), 0.0)
    probs /= probs.sum()
    assert chi_square_pvalue(tokens, probs) > 1e-3
    # Log-probs are of the tempered, untruncated distribution.
    np.testing.assert_allclose(np.asarray(log_probs), np_log_softmax(scaled)[tokens], atol=1e-5)


@pytest.mark.parametrize("cache_step", [gen.CACHE_STEP, 2])
def test_sampled_log_probs_equal_full_forward(tiny, cache_step: int):
    model, params = tiny
    prompts = gen.left_pad(PROMPTS)
    sampling = gen.SamplingConfig(temperature=0.7, top_k=40, top_p=0.95)
    key = jax.random.key(11)
    args = (model, params, prompts.tokens, prompts.segment_ids, key)
    kwargs = dict(max_new_tokens=NEW, sampling=sampling, cache_step=cache_step)
    free = gen.generate(*args, **kwargs)
    # Stop row 0 at its third token: same key, so the rows agree up to eos.
    eos = int(free.tokens[0, 2])
    out = gen.generate(*args, **kwargs, eos_id=eos, pad_id=0)
    tokens, mask = np.asarray(out.tokens), np.asarray(out.mask)
    for row in range(len(PROMPTS)):
        hits = np.flatnonzero(np.asarray(free.tokens[row]) == eos)
        stop = hits[0] + 1 if hits.size else NEW
        np.testing.assert_array_equal(mask[row], np.arange(NEW) < stop)
        np.testing.assert_array_equal(tokens[row, :stop], np.asarray(free.tokens[row, :stop]))
        np.testing.assert_array_equal(tokens[row, stop:], 0)
    assert not mask[0].all()  # row 0 did stop early

    plen = prompts.tokens.shape[1]
    logits = full_logits(model, params, *joined(prompts, tokens, mask))[:, plen - 1 : -1]
    at = np.arange(len(PROMPTS))[:, None], np.arange(NEW)[None], tokens
    tempered = np.where(mask, np_log_softmax(logits / sampling.temperature)[at], 0.0)
    np.testing.assert_allclose(np.asarray(out.log_probs), tempered, atol=1e-5)
    assert np.all(np.asarray(out.log_probs)[~mask] == 0.0)

    # The scoring helper reproduces them, and gives untempered ones at T = 1.
    score = jax.jit(gen.completion_log_probs, static_argnums=0)
    np.testing.assert_allclose(
        np.asarray(score(model, params, *prompts[:2], out, sampling.temperature)),
        tempered,
        atol=1e-5,
    )
    untempered = np.where(mask, np_log_softmax(logits)[at], 0.0)
    np.testing.assert_allclose(
        np.asarray(score(model, params, *prompts[:2], out, 1.0)), untempered, atol=1e-5
    )


def test_deterministic_for_a_key(tiny):
    model, params = tiny
    prompts = gen.left_pad(PROMPTS)
    sampling = gen.SamplingConfig(temperature=0.7, top_k=40, top_p=0.95)

    def run(seed: int) -> np.ndarray:
        out = gen.generate(
            model,
            params,
            prompts.tokens,
            prompts.segment_ids,
            jax.random.key(seed),
            max_new_tokens=NEW,
            sampling=sampling,
        )
        return np.asarray(out.tokens)

    np.testing.assert_array_equal(run(11), run(11))
    assert not np.array_equal(run(11), run(12))


def test_generate_traces_for_every_preset():
    """Shapes only (eval_shape): every preset, incl. bf16, GQA and untied heads, decodes."""
    prompts = gen.left_pad(PROMPTS)
    for name in PRESETS:
        model = Transformer(get_preset(name, num_layers=1))
        abstract = abstract_params(model)
        out = jax.eval_shape(
            lambda p, m=model: gen.generate(
                m, p, prompts.tokens, prompts.segment_ids, jax.random.key(0), max_new_tokens=3
            ),
            abstract,
        )
        assert out.tokens.shape == out.log_probs.shape == out.mask.shape == (len(PROMPTS), 3)
        assert out.log_probs.dtype == jnp.float32, name


# ----------------------------------------------------------------------------- sharding


@pytest.mark.parametrize("cache_step", [gen.CACHE_STEP, 2])
def test_sharded_decode_equals_single_device(tiny, cache_step: int):
    model, params = tiny
    prompts = gen.left_pad(PROMPTS)  # batch 4 = data x fsdp
    mesh = sh.make_mesh(data=2, fsdp=2, tensor=2)
    rules = sh.get_rules("fsdp_tp")
    k_spec = gen.cache_shardings(mesh, rules)["k"].spec
    assert tuple(k_spec) == (None, ("data", "fsdp"), "tensor", None, None)

    sampling = gen.SamplingConfig(temperature=0.7, top_k=40, top_p=0.95)
    kwargs = dict(max_new_tokens=NEW, sampling=sampling, cache_step=cache_step)
    args = (prompts.tokens, prompts.segment_ids, jax.random.key(5))
    single = gen.generate(model, params, *args, **kwargs)
    sharded_params = jax.device_put(params, param_shardings(model, mesh, rules))
    sharded = gen.generate(model, sharded_params, *args, mesh=mesh, rules=rules, **kwargs)

    assert len(sharded.tokens.sharding.device_set) == 8
    np.testing.assert_array_equal(np.asarray(sharded.tokens), np.asarray(single.tokens))
    np.testing.assert_array_equal(np.asarray(sharded.mask), np.asarray(single.mask))
    np.testing.assert_allclose(
        np.asarray(sharded.log_probs), np.asarray(single.log_probs), atol=1e-5
    )


def test_vocab_limit_never_draws_padded_ids_and_log_probs_agree():
    cfg = get_preset("tiny")
    model = Transformer(cfg)
    params = init_params(model)
    prompts = gen.left_pad([[2, 5, 9], [2, 7]])
    sampling = gen.SamplingConfig(temperature=3.0, vocab_limit=40)  # hot: mass spreads widely
    out = gen.generate(
        model,
        params,
        prompts.tokens,
        prompts.segment_ids,
        jax.random.key(0),
        max_new_tokens=24,
        sampling=sampling,
    )
    assert int(np.max(np.asarray(out.tokens))) < 40
    rescored = gen.completion_log_probs(
        model, params, prompts.tokens, prompts.segment_ids, out, temperature=3.0, vocab_limit=40
    )
    np.testing.assert_allclose(np.asarray(rescored), np.asarray(out.log_probs), atol=1e-5)


# ----------------------------------------------------------------------------- norm / position


@pytest.mark.parametrize(
    "norm, position", [("rmsnorm", "learned"), ("rmsnorm", "none"), ("layernorm", "rope")]
)
def test_cached_logits_equal_full_forward_for_norm_and_position(norm: str, position: str):
    """Prefill + decode equals the full forward, and left padding is invisible: the decode
    step must read the learned table at the token's position, not its cache slot."""
    model = Transformer(get_preset("tiny", norm=norm, position=position))
    params = init_params(model, seed=11)
    prompts = gen.left_pad(PROMPTS)
    forced = np.random.default_rng(1).integers(1, 256, (len(PROMPTS), NEW)).astype(np.int32)
    plen = prompts.tokens.shape[1]

    stepwise = cached_forced_logits(model, params, prompts, forced)  # [B, NEW, V]

    reference = full_logits(model, params, *joined(prompts, forced))[:, plen - 1 : -1]
    np.testing.assert_allclose(stepwise, reference, atol=1e-5, rtol=1e-5)
    for row, prompt in enumerate(PROMPTS):  # each sequence alone, unpadded, from slot 0
        seq = np.concatenate([prompt, forced[row]])[None].astype(np.int32)
        alone = full_logits(model, params, seq, np.ones_like(seq), np.arange(seq.size)[None])
        np.testing.assert_allclose(
            stepwise[row], alone[0, len(prompt) - 1 : len(prompt) - 1 + NEW], atol=1e-5, rtol=1e-5
        )
