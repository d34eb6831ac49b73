"""Generation: prefill in one forward pass, then one token per step from a fixed-size KV cache.

Layout. Prompts are left-padded to a common length P (`left_pad`): pad slots have segment
id 0 and real tokens segment id 1, and RoPE positions start at 0 at each row's first real
token, so the padding is invisible to the math. The cache ends with P + N slots (N =
`max_new_tokens`); the prompt fills slots [0, P) and generated token i is written at slot
P + i when it is fed back. Because every row's last prompt slot is real, the prefill logits
at slot P - 1 give every row's first new token.

Loop. `generate` is one jitted function: prefill, sample token 0, then `lax.while_loop`s
that feed the previous token ([B, 1]) through the model and sample the next, exiting when
N tokens are out or every row has emitted `eos_id`. Rows that finished keep stepping (the
batch is fixed) but their outputs are masked: `tokens` holds `pad_id`, `log_probs` 0 and
`mask` False from the step after eos on. The eos token itself is generated (mask True).

Cache growth. A decode step reads every slot of the cache, live or not, so its cost grows
with the cache's length. The cache therefore starts with room for `cache_step` new tokens
and doubles that room whenever it fills (`cache_sizes`): one while loop per size, the
slots copied into the longer cache between them (zeros are empty slots, masked out).
With N <= `cache_step` there is one loop, as with a fixed P + N cache.

Sampling order (the Hugging Face convention): logits / T, then top-k, then top-p on the
tempered distribution, then a categorical draw. Temperature 0 means greedy (argmax).
Step i draws with `fold_in(key, i)`, so a key fixes the output on any mesh (threefry is
partitionable by default).

Log-probs. `log_probs[b, i]` is log_softmax(logits / T)[token] over the full vocabulary,
before top-k/top-p truncation: the log-probability of the token under the policy at
temperature T, which is what an RLHF trainer recomputes from a forward pass with
`completion_log_probs(..., temperature=T)` (PPO ratios and KL terms then match). With
truncation it is not the log of the probability the token was actually drawn with (that
distribution is renormalized over the kept tokens). With greedy decoding (T = 0) it is
the untempered log_softmax(logits)[token]. For untempered log-probs of tempered samples,
call `completion_log_probs(..., temperature=1.0)` on the output.

Streaming (chat) cannot come out of one jitted loop; drive `prefill` and a jitted
`decode_step` from Python with `sample_logits` instead, the same pieces `generate` uses.

Sharding. With a mesh and rules, the cache is constrained to `CACHE_AXES` under the same
rule table as the model (batch over data/fsdp, kv heads over tensor), and the model's own
activation constraints resolve because tracing runs inside `sharding_context`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, PartitionSpec

from model import fused_decode, lora
from model import sharding as sh
from model.transformer import CACHE_AXES, init_cache

Params = Any
# New tokens the cache has room for before it first grows (`cache_sizes`).
CACHE_STEP = 64
# generate's decode steps: the model's own ("xla") or one CPU kernel call ("cpu").
DECODE_IMPLS = ("xla", "cpu")
# One compiled call: eager indexing then a reduction cost milliseconds per rollout.
_last_slots_real = jax.jit(lambda segment_ids: jnp.all(segment_ids[:, -1] != 0))


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How tokens are drawn. temperature 0 = greedy; top_k 0 and top_p 1.0 = no truncation.

    Fields are static under jit: each distinct config compiles once.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    # > 0: ids >= vocab_limit are never drawn (the model's vocabulary is padded past the
    # tokenizer's); log-probs are then over the first vocab_limit ids.
    vocab_limit: int = 0
    # Each decode step as the model's forward pass ("xla") or one CPU kernel call ("cpu").
    decode_impl: str = "xla"

    def __post_init__(self) -> None:
        if not self.temperature >= 0.0:
            raise ValueError(f"sampling.temperature={self.temperature!r}: must be >= 0")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise ValueError(f"sampling.top_k={self.top_k!r}: must be an integer >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"sampling.top_p={self.top_p!r}: must be in (0, 1]")
        if not (isinstance(self.vocab_limit, int) and self.vocab_limit >= 0):
            raise ValueError(f"sampling.vocab_limit={self.vocab_limit!r}: must be an integer >= 0")
        if self.decode_impl not in DECODE_IMPLS:
            raise ValueError(
                f"sampling.decode_impl={self.decode_impl!r}: must be one of {DECODE_IMPLS}"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class Prompts(NamedTuple):
    """Left-padded prompts, each [B, P] int32: ids, segment ids (0 = pad), RoPE positions."""

    tokens: np.ndarray
    segment_ids: np.ndarray
    positions: np.ndarray


class GenerateOutput(NamedTuple):
    tokens: jax.Array  # [B, N] int32 generated ids, pad_id where mask is False
    log_probs: jax.Array  # [B, N] fp32 log_softmax(logits / T)[token] (see module doc), 0 off mask
    mask: jax.Array  # [B, N] bool: a generated token (up to and including eos)


# ----------------------------------------------------------------------------- prompts


def left_pad(
    prompts: Sequence[Sequence[int]], pad_id: int = 0, length: int | None = None
) -> Prompts:
    """Token-id lists -> left-padded [B, P] arrays, P = `length` or the longest prompt.

    A fixed `length` keeps shapes (and so compilations) constant across batches.
    """
    if not prompts:
        raise ValueError("left_pad: no prompts")
    longest = max(len(p) for p in prompts)
    if min(len(p) for p in prompts) == 0:
        raise ValueError("left_pad: empty prompt (start it with a BOS token)")
    length = longest if length is None else length
    if longest > length:
        raise ValueError(f"left_pad: a prompt has {longest} tokens, more than length={length}")
    tokens = np.full((len(prompts), length), pad_id, np.int32)
    segment_ids = np.zeros((len(prompts), length), np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, length - len(prompt) :] = prompt
        segment_ids[row, length - len(prompt) :] = 1
    return Prompts(tokens, segment_ids, np.asarray(prompt_positions(segment_ids)))


def prompt_positions(segment_ids: jax.Array) -> jax.Array:
    """[B, T] RoPE positions: 0 at each row's first non-pad slot, counting non-pad slots.

    Pad slots get a clipped count (their position is never used). Works for left-padded
    prompts and for prompt + completion sequences with right padding.
    """
    count = jnp.cumsum((jnp.asarray(segment_ids) != 0).astype(jnp.int32), axis=-1)
    return jnp.maximum(count - 1, 0)


# ----------------------------------------------------------------------------- sampling


def top_k_filter(logits: jax.Array, k: int) -> jax.Array:
    """[..., V] -> logits outside the k largest set to -inf (ties at the k-th value kept)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits >= kth, logits, -jnp.inf)


def top_p_filter(logits: jax.Array, p: float) -> jax.Array:
    """[..., V] -> the smallest set of most likely tokens whose probability reaches p, kept.

    A token is kept when the mass of the strictly more likely tokens is below p, so the
    most likely token always survives; ties at the cut-off value are kept.
    """
    if p >= 1.0:
        return logits
    desc = -jnp.sort(-logits, axis=-1)
    probs = jax.nn.softmax(desc, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    cutoff = jnp.min(jnp.where(mass_before < p, desc, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits >= cutoff, logits, -jnp.inf)


def token_log_probs(log_probs: jax.Array, tokens: jax.Array) -> jax.Array:
    """Gather log_probs [..., V] at tokens [...] -> [...]."""
    if log_probs.shape[:-1] != tokens.shape:
        raise ValueError(f"log_probs {log_probs.shape} and tokens {tokens.shape} disagree")
    return jnp.take_along_axis(log_probs, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]


def limit_vocab(logits: jax.Array, vocab_limit: int) -> jax.Array:
    """[..., V] -> logits of ids >= vocab_limit set to -inf (no-op when vocab_limit is 0)."""
    if not vocab_limit or vocab_limit >= logits.shape[-1]:
        return logits
    return jnp.where(jnp.arange(logits.shape[-1]) < vocab_limit, logits, -jnp.inf)


def sample_logits(
    key: jax.Array, logits: jax.Array, sampling: SamplingConfig
) -> tuple[jax.Array, jax.Array]:
    """Draw one token per row. logits [B, V] -> (tokens [B] int32, log-probs [B] fp32).

    The log-probs are log_softmax(logits / T) at the drawn token, before truncation
    (log_softmax(logits) when greedy).
    """
    logits = limit_vocab(logits.astype(jnp.float32), sampling.vocab_limit)
    if sampling.greedy:
        tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return tokens, token_log_probs(jax.nn.log_softmax(logits, axis=-1), tokens)
    scaled = logits / sampling.temperature
    truncated = top_p_filter(top_k_filter(scaled, sampling.top_k), sampling.top_p)
    tokens = jax.random.categorical(key, truncated, axis=-1).astype(jnp.int32)
    return tokens, token_log_probs(jax.nn.log_softmax(scaled, axis=-1), tokens)


# ----------------------------------------------------------------------------- model calls


def prefill(
    model: nn.Module,
    params: Params,
    tokens: jax.Array,
    segment_ids: jax.Array,
    positions: jax.Array,
    cache: dict,
) -> tuple[jax.Array, dict]:
    """Write the prompt [B, P] into cache slots [0, P).

    Returns (logits [B, V] at slot P - 1, the updated cache).
    """
    options = dict(cache=cache, cache_index=0, last_logits_only=True)  # head at slot P-1 only
    out = model.apply({"params": params}, tokens, positions, segment_ids, **options)
    return out.logits[:, -1], out.cache


def decode_step(
    model: nn.Module,
    params: Params,
    cache: dict,
    token: jax.Array,
    position: jax.Array,
    slot: jax.Array | int,
) -> tuple[jax.Array, dict]:
    """Feed token [B] at RoPE position [B] into cache slot `slot` (a scalar).

    Returns (next-token logits [B, V], the updated cache).
    """
    token = token[:, None]
    out = model.apply(
        {"params": params},
        token,
        position[:, None],
        jnp.ones_like(token, jnp.int32),
        cache=cache,
        cache_index=slot,
    )
    return out.logits[:, 0], out.cache


def cache_shardings(mesh: Mesh, rules: sh.Rules) -> dict:
    """NamedShardings of the cache from its logical axes (`CACHE_AXES`) and the rule table."""
    specs = {name: PartitionSpec(*axes) for name, axes in CACHE_AXES.items()}
    return sh.logical_to_sharding(specs, mesh, rules)


def _cache_constraint(mesh: Mesh | None, rules: sh.Rules | None) -> Callable[[dict], dict]:
    if mesh is None:
        return lambda cache: cache
    shardings = cache_shardings(mesh, rules)
    return lambda cache: jax.lax.with_sharding_constraint(cache, shardings)


# ----------------------------------------------------------------------------- the loop


def cache_sizes(prompt_len: int, max_new_tokens: int, cache_step: int) -> tuple[int, ...]:
    """The cache lengths the decode loop goes through: P + cache_step * 2**k, then P + N."""
    if cache_step < 1:
        raise ValueError(f"cache_step={cache_step}: must be >= 1")
    sizes, room = [], cache_step
    while room < max_new_tokens:
        sizes.append(prompt_len + room)
        room *= 2
    return (*sizes, prompt_len + max_new_tokens)


def grow_cache(cache: dict, length: int) -> dict:
    """The cache with its slot axis padded to `length` (new slots empty: segment id 0)."""

    def pad(name: str, buffer: jax.Array) -> jax.Array:
        axis = CACHE_AXES[name].index(sh.CACHE_LENGTH)
        widths = [(0, 0)] * buffer.ndim
        widths[axis] = (0, length - buffer.shape[axis])
        return jnp.pad(buffer, widths)

    return {name: pad(name, buffer) for name, buffer in cache.items()}


class _LoopState(NamedTuple):
    step: jax.Array  # scalar int32: index of the next token to sample
    cache: dict
    last: jax.Array  # [B] the token sampled at step - 1
    done: jax.Array  # [B] bool: eos already emitted
    tokens: jax.Array  # [B, N]
    log_probs: jax.Array  # [B, N]
    mask: jax.Array  # [B, N]


def _write_column(buffer: jax.Array, column: jax.Array, step: jax.Array) -> jax.Array:
    return jax.lax.dynamic_update_slice_in_dim(buffer, column[:, None], step, axis=1)


@functools.partial(
    jax.jit,
    static_argnames=(
        "model",
        "max_new_tokens",
        "sampling",
        "eos_id",
        "pad_id",
        "mesh",
        "rules",
        "cache_step",
    ),
)
def _generate(
    params: Params,
    tokens: jax.Array,
    segment_ids: jax.Array,
    key: jax.Array,
    *,
    model: nn.Module,
    max_new_tokens: int,
    sampling: SamplingConfig,
    eos_id: int | None,
    pad_id: int,
    mesh: Mesh | None,
    rules: sh.Rules | None,
    cache_step: int,
) -> GenerateOutput:
    batch, prompt_len = tokens.shape
    model, params = lora.merged(model, params)  # adapters merged once, not per decode step
    constrain = _cache_constraint(mesh, rules)
    positions = prompt_positions(segment_ids)
    lengths = jnp.sum(segment_ids != 0, axis=-1).astype(jnp.int32)  # [B]
    sizes = cache_sizes(prompt_len, max_new_tokens, cache_step)
    cache = constrain(init_cache(model.config, batch, sizes[0]))
    logits, cache = prefill(model, params, tokens, segment_ids, positions, cache)
    fused = sampling.decode_impl == "cpu"  # model/fused_decode.py
    step_fn = fused_decode.decode_step if fused else decode_step
    step_params = fused_decode.decode_params(model.config, params) if fused else params

    def emit(state: _LoopState, logits: jax.Array) -> _LoopState:
        token, log_prob = sample_logits(jax.random.fold_in(key, state.step), logits, sampling)
        live = ~state.done
        token = jnp.where(live, token, pad_id)
        log_prob = jnp.where(live, log_prob, 0.0)
        done = state.done if eos_id is None else state.done | (token == eos_id)
        return state._replace(
            step=state.step + 1,
            last=token,
            done=done,
            tokens=_write_column(state.tokens, token, state.step),
            log_probs=_write_column(state.log_probs, log_prob, state.step),
            mask=_write_column(state.mask, live, state.step),
        )

    def cond(state: _LoopState, size: int) -> jax.Array:
        fits = prompt_len + state.step - 1 < size  # the slot the next step writes
        return (state.step < max_new_tokens) & ~jnp.all(state.done) & fits

    def body(state: _LoopState) -> _LoopState:
        # Token step-1 sits at slot P+step-1 and RoPE position length+step-1.
        offset = state.step - 1
        logits, cache = step_fn(
            model, step_params, state.cache, state.last, lengths + offset, prompt_len + offset
        )
        return emit(state._replace(cache=constrain(cache)), logits)

    state = _LoopState(
        step=jnp.zeros((), jnp.int32),
        cache=cache,
        last=jnp.full((batch,), pad_id, jnp.int32),
        done=jnp.zeros((batch,), bool),
        tokens=jnp.full((batch, max_new_tokens), pad_id, jnp.int32),
        log_probs=jnp.zeros((batch, max_new_tokens), jnp.float32),
        mask=jnp.zeros((batch, max_new_tokens), bool),
    )
    state = emit(state, logits)
    for size in sizes:
        if size > state.cache["segment_ids"].shape[1]:
            state = state._replace(cache=constrain(grow_cache(state.cache, size)))
        state = jax.lax.while_loop(functools.partial(cond, size=size), body, state)
    return GenerateOutput(state.tokens, state.log_probs, state.mask)


def generate(
    model: nn.Module,
    params: Params,
    tokens: jax.Array,
    segment_ids: jax.Array,
    key: jax.Array,
    *,
    max_new_tokens: int,
    sampling: SamplingConfig = SamplingConfig(),
    eos_id: int | None = None,
    pad_id: int = 0,
    mesh: Mesh | None = None,
    rules: sh.Rules | None = None,
    cache_step: int = CACHE_STEP,
) -> GenerateOutput:
    """Sample up to `max_new_tokens` tokens after left-padded prompts.

    model: a `Transformer` with its LM head; params: its unboxed parameters (sharded as
    `param_shardings` gives when a mesh is used); tokens, segment_ids: [B, P] from
    `left_pad` (segment id 1 = prompt token, 0 = left pad; every row needs a token in
    slot P-1); key: a PRNG key; cache_step: the new tokens the cache first has room for
    (it doubles that room when full, see the module doc). `sampling.decode_impl` "cpu"
    runs each decode step as one CPU kernel call (model/fused_decode.py: fp32 Llama-style
    blocks, one device). Returns `GenerateOutput`, each
    field [B, N]. One compilation per (model, shapes, sampling, eos_id, pad_id, mesh,
    rules, cache_step).
    """
    tokens = jnp.asarray(tokens, jnp.int32)
    segment_ids = jnp.asarray(segment_ids, jnp.int32)
    if tokens.ndim != 2 or tokens.shape != segment_ids.shape:
        raise ValueError(f"tokens {tokens.shape} and segment_ids {segment_ids.shape}: need [B, P]")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: must be >= 1")
    total = tokens.shape[1] + max_new_tokens
    if total > model.config.max_seq_len:
        raise ValueError(
            f"prompt length {tokens.shape[1]} + max_new_tokens {max_new_tokens} = {total} "
            f"exceeds model.max_seq_len={model.config.max_seq_len}"
        )
    if not getattr(model, "lm_head", True):
        raise ValueError("generate: the model has no LM head")
    if not isinstance(segment_ids, jax.core.Tracer) and not bool(_last_slots_real(segment_ids)):
        raise ValueError("generate: prompts must be left-padded (a real token in every last slot)")
    if (mesh is None) != (rules is None):
        raise ValueError("generate: pass both mesh and rules, or neither")
    if sampling.decode_impl == "cpu":
        fused_decode.check_supported(model.config, params, mesh)
    kwargs = dict(
        model=model,
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        eos_id=eos_id,
        pad_id=pad_id,
        mesh=mesh,
        rules=rules,
        cache_step=cache_step,
    )
    if mesh is None:
        return _generate(params, tokens, segment_ids, key, **kwargs)
    abstract = jax.eval_shape(functools.partial(init_cache, model.config, tokens.shape[0], total))
    sh.check_divisible(abstract, cache_shardings(mesh, rules))
    batch_sharding = sh.batch_sharding(mesh, rules)
    tokens, segment_ids = jax.device_put((tokens, segment_ids), batch_sharding)
    with sh.sharding_context(mesh, rules):
        return _generate(params, tokens, segment_ids, key, **kwargs)


# ----------------------------------------------------------------------------- scoring


def join_completion(
    tokens: jax.Array, segment_ids: jax.Array, output: GenerateOutput
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Prompt [B, P] + completion [B, N] -> (tokens, segment_ids, positions), each [B, P+N].

    The layout a forward pass over a rollout uses: left pad, prompt, completion (segment
    id 1), right pad after eos (segment id 0).
    """
    joined = jnp.concatenate([tokens, output.tokens], axis=1)
    segments = jnp.concatenate([segment_ids, output.mask.astype(jnp.int32)], axis=1)
    return joined, segments, prompt_positions(segments)


def completion_log_probs(
    model: nn.Module,
    params: Params,
    tokens: jax.Array,
    segment_ids: jax.Array,
    output: GenerateOutput,
    temperature: float | jax.Array = 1.0,
    vocab_limit: int = 0,
) -> jax.Array:
    """Log-probs [B, N] of the completion under one full forward pass at `temperature`.

    log_softmax(logits / temperature) at the generated tokens, 0 off the mask. With the
    sampling temperature it reproduces `output.log_probs`; with 1.0 it gives the
    untempered ones. Pass the sampler's `vocab_limit` to score the same distribution.
    """
    prompt_len = tokens.shape[1]
    joined, segments, positions = join_completion(tokens, segment_ids, output)
    logits = model.apply({"params": params}, joined, positions, segments).logits
    logits = logits[:, prompt_len - 1 : -1].astype(jnp.float32)  # predicts the N tokens
    logits = limit_vocab(logits, vocab_limit) / temperature
    log_probs = token_log_probs(jax.nn.log_softmax(logits, axis=-1), output.tokens)
    return jnp.where(output.mask, log_probs, 0.0)
