"""Rollouts: sampler/learner log-prob agreement (the PPO health check), masks, decoding."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from model.config import get_preset
from model.generate import SamplingConfig
from model.tokenizer import END_ID, train_tokenizer
from model.transformer import Transformer
from rlhf import rollout as ro
from rlhf import tasks

PROMPT_LEN, NEW = 16, 10
SAMPLED = SamplingConfig(temperature=0.7, top_k=20)
# The learner's forward under jit, as a trainer runs it (eager apply is slow).
learner_log_probs = jax.jit(ro.learner_log_probs, static_argnums=(0, 3))


def random_params(model: Transformer, seed: int = 0):
    """Weights drawn in numpy (no init compile); norm scales 1."""
    abstract = nn.unbox(
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    )
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        if jax.tree_util.keystr(path).endswith("['scale']"):
            return jnp.ones(leaf.shape, leaf.dtype)
        return jnp.asarray(rng.normal(0.0, 0.1, leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, abstract)


@pytest.fixture(scope="module")
def setup():
    task = tasks.SortLetters()
    rng = np.random.default_rng(0)
    tokenizer = train_tokenizer(task.pretraining_corpus(rng, 20), 400, model_type="char")
    model = Transformer(dataclasses.replace(get_preset("tiny"), vocab_size=384))
    prompts = task.prompts(rng, 4)
    return task, tokenizer, model, random_params(model), prompts


def test_sampling_for_limits_padded_vocab(setup):
    _, tokenizer, _, _, _ = setup
    n = tokenizer.vocab_size
    assert ro.sampling_for(SamplingConfig(), 384, tokenizer).vocab_limit == n
    assert ro.sampling_for(SamplingConfig(), n, tokenizer).vocab_limit == 0
    with pytest.raises(ValueError, match="exceeds"):
        ro.sampling_for(SamplingConfig(vocab_limit=n + 1), 384, tokenizer)
    with pytest.raises(ValueError, match="smaller"):
        ro.sampling_for(SamplingConfig(), n - 1, tokenizer)


def test_encode_prompts_fixed_length(setup):
    _, tokenizer, _, _, prompts = setup
    batch = ro.encode_prompts(tokenizer, prompts, PROMPT_LEN)
    assert batch.tokens.shape == (4, PROMPT_LEN)
    assert np.all(batch.segment_ids[:, -1] == 1)
    with pytest.raises(ValueError, match="more than"):
        ro.encode_prompts(tokenizer, ["sort " + "a" * 40], PROMPT_LEN)


def test_trim_prompts_drops_only_pad_columns_to_a_multiple_of_8():
    """Hand-made rows of 3 and 11 tokens padded to 24: 11 rounds up to 16 columns."""
    rows = [[5, 6, 7], list(range(1, 12))]
    full = ro.left_pad(rows, length=24)
    cut = ro.trim_prompts(full)
    assert cut.tokens.shape == cut.segment_ids.shape == cut.positions.shape == (2, 16)
    np.testing.assert_array_equal(cut.tokens[1, 5:], range(1, 12))
    np.testing.assert_array_equal(cut.tokens[0, 13:], [5, 6, 7])
    assert cut.segment_ids.sum() == 14 and cut.positions[1, -1] == 10
    assert ro.trim_prompts(ro.left_pad([list(range(1, 18))], length=24)).tokens.shape == (1, 24)
    assert ro.trim_prompts(full, multiple=4).tokens.shape == (2, 12)


def test_a_trimmed_batch_samples_what_the_full_width_one_does(setup):
    """Pad columns are invisible: the same responses and log-probs from 24 or 16 columns."""
    _, tokenizer, model, params, prompts = setup
    sampling = ro.sampling_for(SAMPLED, model.config.vocab_size, tokenizer)
    full = ro.encode_prompts(tokenizer, prompts, 24)
    cut = ro.trim_prompts(full)
    assert cut.tokens.shape[1] < 24
    outs = [
        ro.sample(model, params, b, jax.random.key(3), max_new_tokens=NEW, sampling=sampling)
        for b in (full, cut)
    ]
    np.testing.assert_array_equal(np.asarray(outs[0].tokens), np.asarray(outs[1].tokens))
    np.testing.assert_allclose(
        np.asarray(outs[0].log_probs), np.asarray(outs[1].log_probs), atol=1e-5
    )


@pytest.mark.parametrize("sampling", [SAMPLED, SamplingConfig(temperature=0.0)])
def test_learner_log_probs_match_sampler(setup, sampling):
    task, tokenizer, model, params, prompts = setup
    sampling = ro.sampling_for(sampling, model.config.vocab_size, tokenizer)
    batch = ro.encode_prompts(tokenizer, prompts, PROMPT_LEN)
    rollout = ro.sample(
        model, params, batch, jax.random.key(1), max_new_tokens=NEW, sampling=sampling
    )
    assert rollout.tokens.shape == rollout.log_probs.shape == rollout.mask.shape == (4, NEW)
    mask = np.asarray(rollout.mask)
    assert np.all(np.asarray(rollout.tokens)[mask] < tokenizer.vocab_size)
    ended = np.asarray(rollout.ended)
    np.testing.assert_array_equal(ended, ((np.asarray(rollout.tokens) == END_ID) & mask).any(-1))
    learner = learner_log_probs(model, params, rollout, sampling)
    gap = ro.check_log_probs(rollout.log_probs, learner, rollout.mask, atol=1e-4)
    assert gap < 1e-4
    assert np.all(np.asarray(learner)[~mask] == 0)
    texts = ro.decode_responses(tokenizer, rollout)
    assert len(texts) == 4
    assert all(0.0 <= task.score(p, t) <= 1.0 for p, t in zip(prompts, texts, strict=True))


def test_health_check_fails_loudly_on_mismatch(setup):
    _, tokenizer, model, params, prompts = setup
    sampling = ro.sampling_for(SAMPLED, model.config.vocab_size, tokenizer)
    batch = ro.encode_prompts(tokenizer, prompts, PROMPT_LEN)
    rollout = ro.sample(
        model, params, batch, jax.random.key(2), max_new_tokens=NEW, sampling=sampling
    )
    moved = jax.tree_util.tree_map(lambda p: p * 1.05, params)
    with pytest.raises(ValueError, match="health check"):
        ro.check_log_probs(
            rollout.log_probs, learner_log_probs(model, moved, rollout, sampling), rollout.mask
        )
    untempered = dataclasses.replace(sampling, temperature=1.0)
    with pytest.raises(ValueError, match="health check"):
        ro.check_log_probs(
            rollout.log_probs,
            learner_log_probs(model, params, rollout, untempered),
            rollout.mask,
        )
    with pytest.raises(ValueError, match=r"\[B, N\]"):
        ro.check_log_probs(rollout.log_probs, rollout.log_probs[:, 1:], rollout.mask)
