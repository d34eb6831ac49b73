"""Rollouts: sample responses for a batch of prompts, and the sampler/learner health check.

A rollout is what PPO, GRPO and best-of-n need from the sampler (model/generate.py):
the prompts [B, P] (left padded, chat template with the assistant marker at the end),
the response tokens [B, N], their log-probs under the sampling policy [B, N] and the
response mask [B, N] (1 up to and including the end-of-turn token `END_ID`), plus
`ended` [B] (the response emitted its end-of-turn token before N tokens ran out).

Log-probs. The sampler returns log_softmax(limit_vocab(logits) / T)[token] before top-k /
top-p truncation (see model/generate.py), and the learner recomputes the same quantity
with `learner_log_probs` (one forward pass over prompt + response, same T and
vocab_limit). With greedy sampling both are the untempered log-probs. PPO's ratio uses
these, so `check_log_probs` must pass on every rollout before learning: a mismatch means
the two sides disagree about weights, temperature, vocabulary limit, positions or padding,
and every ratio and KL would be silently wrong.

Decision: the model's vocabulary may be padded past the tokenizer's (rows never trained);
`sampling_for` refuses a sampling config that could draw those ids.
Host-side helpers (`decode_responses`) read arrays with np.asarray: single process; a
multi-host caller gathers first (train/sft.py `to_host`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh

from model import sharding as sh
from model.generate import (
    GenerateOutput,
    Prompts,
    SamplingConfig,
    completion_log_probs,
    generate,
    left_pad,
)
from model.tokenizer import END_ID, PAD_ID, AnyTokenizer

Params = Any


class Rollout(NamedTuple):
    prompt_tokens: jax.Array  # [B, P] int32, left padded with PAD_ID
    prompt_segment_ids: jax.Array  # [B, P] int32, 0 = pad, 1 = prompt
    tokens: jax.Array  # [B, N] int32 response ids, PAD_ID off the mask
    log_probs: jax.Array  # [B, N] fp32 sampler log-probs (module doc), 0 off the mask
    mask: jax.Array  # [B, N] bool: a response token (up to and including END_ID)
    ended: jax.Array  # [B] bool: END_ID was emitted within N tokens

    @property
    def output(self) -> GenerateOutput:
        """The response as model/generate.py's `GenerateOutput` (for its scoring helpers)."""
        return GenerateOutput(self.tokens, self.log_probs, self.mask)


def sampling_for(
    sampling: SamplingConfig, model_vocab: int, tokenizer: AnyTokenizer
) -> SamplingConfig:
    """`sampling` with vocab_limit set to the tokenizer's size when the model's is larger.

    Raises if an explicit vocab_limit exceeds the tokenizer (padded ids could be drawn).
    """
    n = tokenizer.vocab_size
    if model_vocab < n:
        raise ValueError(f"model vocab_size={model_vocab} is smaller than the tokenizer's {n}")
    if sampling.vocab_limit > n:
        raise ValueError(f"sampling.vocab_limit={sampling.vocab_limit} exceeds the tokenizer's {n}")
    if model_vocab > n and not sampling.vocab_limit:
        return dataclasses.replace(sampling, vocab_limit=n)
    return sampling


def encode_prompts(tokenizer: AnyTokenizer, prompts: Sequence[str], length: int) -> Prompts:
    """User-turn strings -> chat-template prompts left padded to exactly `length` tokens.

    Each row is bos, `<|user|>`, the prompt, `<|end|>`, `<|assistant|>`. A fixed length
    keeps one compilation for every batch. Raises if a prompt does not fit (cutting it
    would change the task).
    """
    rows = []
    for prompt in prompts:
        ids, _ = tokenizer.encode_chat(
            [{"role": "user", "content": prompt}], add_generation_prompt=True
        )
        if ids.size > length:
            raise ValueError(f"prompt {prompt!r} takes {ids.size} tokens, more than {length}")
        rows.append(ids.tolist())
    return left_pad(rows, tokenizer.pad_id, length)


# Prompt batches are cut to a multiple of this many slots: few widths, so few compilations.
PROMPT_WIDTH_MULTIPLE = 8


# Small compiled helpers: the same ops run eagerly cost milliseconds of dispatch each,
# a visible share of a small model's rollout.
@jax.jit
def _longest_prompt(segment_ids: jax.Array) -> jax.Array:
    return jnp.max(jnp.sum(segment_ids != 0, axis=1))


@functools.partial(jax.jit, static_argnums=1)
def _drop_columns(prompts: Prompts, start: int) -> Prompts:
    return Prompts(*(x[:, start:] for x in prompts))


@jax.jit
def _ended(tokens: jax.Array, mask: jax.Array, stop_id: jax.Array) -> jax.Array:
    return jnp.any((tokens == stop_id) & mask, axis=-1)


def trim_prompts(prompts: Prompts, multiple: int = PROMPT_WIDTH_MULTIPLE) -> Prompts:
    """Left-padded prompts [B, P] without the pad columns that no row needs: the longest
    prompt's length rounded up to `multiple` (at most P).

    The stages pad prompts to `seq_len`; a batch of shorter ones would otherwise pay for
    the empty slots in the prefill, in every decode step's cache and in each learner pass.
    The width comes from one reduction over the global batch, so every process of a
    multi-host run cuts the same columns. Only pad columns go: no token is lost.
    """
    width = prompts.tokens.shape[1]
    keep = min(width, -(-int(_longest_prompt(prompts.segment_ids)) // multiple) * multiple)
    if keep == width:
        return prompts
    return _drop_columns(prompts, width - keep)


def sample(
    model: nn.Module,
    params: Params,
    prompts: Prompts,
    key: jax.Array,
    *,
    max_new_tokens: int,
    sampling: SamplingConfig,
    mesh: Mesh | None = None,
    rules: sh.Rules | None = None,
    stop_id: int = END_ID,
    pad_id: int = PAD_ID,
) -> Rollout:
    """Sample one response per prompt row (stop at `stop_id`, the tokenizer's end of turn)
    -> `Rollout`.

    For G samples per prompt (GRPO, best-of-n), repeat each prompt row G times.
    """
    out = generate(
        model,
        params,
        prompts.tokens,
        prompts.segment_ids,
        key,
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        eos_id=stop_id,
        pad_id=pad_id,
        mesh=mesh,
        rules=rules,
    )
    ended = _ended(out.tokens, out.mask, stop_id)
    tokens, segment_ids = jnp.asarray(prompts.tokens), jnp.asarray(prompts.segment_ids)
    return Rollout(tokens, segment_ids, out.tokens, out.log_probs, out.mask, ended)


def learner_log_probs(
    model: nn.Module, params: Params, rollout: Rollout, sampling: SamplingConfig
) -> jax.Array:
    """The rollout's response log-probs [B, N] recomputed in one forward pass.

    Same temperature (1 when greedy) and vocab_limit as the sampler; 0 off the mask.
    Differentiable in `params`: the PPO/GRPO learner calls this inside its loss.
    """
    temperature = 1.0 if sampling.greedy else sampling.temperature
    return completion_log_probs(
        model,
        params,
        rollout.prompt_tokens,
        rollout.prompt_segment_ids,
        rollout.output,
        temperature=temperature,
        vocab_limit=sampling.vocab_limit,
    )


def log_prob_gap(sampler: jax.Array, learner: jax.Array, mask: jax.Array) -> float:
    """Largest |sampler - learner| log-prob difference over response tokens ([B, N] each)."""
    if sampler.shape != learner.shape or sampler.shape != mask.shape:
        raise ValueError(
            f"sampler {sampler.shape}, learner {learner.shape} and mask {mask.shape} "
            "log-probs must all be [B, N]"
        )
    gap = jnp.where(mask, jnp.abs(sampler - learner), 0.0)
    return float(jnp.max(gap))


def check_log_probs(
    sampler: jax.Array, learner: jax.Array, mask: jax.Array, atol: float = 1e-3
) -> float:
    """The health check: raise unless the learner reproduces the sampler's log-probs.

    Returns the largest gap (log it). The default tolerance fits fp32 compute; bf16
    compute needs a looser one (the cached decode and the full forward round differently).
    """
    gap = log_prob_gap(sampler, learner, mask)
    if not gap <= atol:  # also catches NaN
        raise ValueError(
            f"rollout health check failed: learner log-probs differ from the sampler's by "
            f"up to {gap:.3g} nats (tolerance {atol:g}); check that both use the same "
            "weights, temperature, vocab_limit and prompt/response layout"
        )
    return gap


def decode_responses(tokenizer: AnyTokenizer, rollout: Rollout) -> list[str]:
    """Response texts (without END_ID / EOS_ID), one per row, for the oracle and labelers."""
    tokens, mask = np.asarray(rollout.tokens), np.asarray(rollout.mask)
    texts = []
    for row_tokens, row_mask in zip(tokens, mask, strict=True):
        ids = [int(t) for t, m in zip(row_tokens, row_mask, strict=True) if m]
        texts.append(
            tokenizer.decode(
                [t for t in ids if t not in tokenizer.stop_ids and t < tokenizer.vocab_size]
            )
        )
    return texts
