"""How fast can one decode step of the random Llama of `decode.py --vs-hf` be in plain JAX?

    python benchmarks/decode_floor.py                  # batch 1 and 16, 320 cache slots
    python benchmarks/decode_floor.py --batch-sizes 1 --repeats 9

A floor for `model/generate.py` on this backend, not a second decoder: the model's shape
(6 layers, d256, 8 query / 4 kv heads of 32, SwiGLU 1024, vocab 4096, tied head), random
weights, greedy, written as bare `jnp` ops without the module system, masks from segment
ids, LoRA, sharding or sampling. A jitted `fori_loop` of --steps one-token steps at cache
slots 100.. of a --slots cache (stacked `[L, B, K, S, H]`, written in place), timed as the
median of --repeats, in ms per step, four ways:

- scan: the layers under `lax.scan` over stacked weights, as the model runs them;
- per_layer: a Python loop over per-layer weight arrays (no stacked weights to slice);
- each again with the attention dropped (the matmuls, norms and RoPE only).

Every variant's greedy tokens are checked equal to the scan's.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

LAYERS, D_MODEL, HEADS, KV_HEADS, HEAD_DIM, MLP_DIM, VOCAB = 6, 256, 8, 4, 32, 1024, 4096


def random_weights(seed: int = 0) -> tuple[dict, jax.Array]:
    """Stacked per-layer weights {name: [L, ...]} and the embedding [V, D]."""
    rng = np.random.default_rng(seed)

    def normal(*shape: int) -> jax.Array:
        return jnp.asarray(rng.normal(0.0, 0.05, shape), jnp.float32)

    n, k = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    layers = {
        "q": normal(LAYERS, D_MODEL, n),
        "k": normal(LAYERS, D_MODEL, k),
        "v": normal(LAYERS, D_MODEL, k),
        "o": normal(LAYERS, n, D_MODEL),
        "gate": normal(LAYERS, D_MODEL, MLP_DIM),
        "up": normal(LAYERS, D_MODEL, MLP_DIM),
        "down": normal(LAYERS, MLP_DIM, D_MODEL),
        "attn_norm": jnp.ones((LAYERS, D_MODEL)),
        "mlp_norm": jnp.ones((LAYERS, D_MODEL)),
    }
    return layers, normal(VOCAB, D_MODEL)


def rms_norm(x: jax.Array, scale: jax.Array) -> jax.Array:
    return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * scale


def rope(x: jax.Array, position: jax.Array) -> jax.Array:
    """x [B, heads, H] at one position (a scalar)."""
    half = x.shape[-1] // 2
    angles = position.astype(jnp.float32) * 10_000.0 ** (-jnp.arange(half) / half)
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def block(x, w, cache, layer, slot, attention: bool):
    """One layer at one token: x [B, D]; cache (k, v), each [L, B, K, S, H]."""
    batch = x.shape[0]
    h = rms_norm(x, w["attn_norm"])
    q = rope((h @ w["q"]).reshape(batch, HEADS, HEAD_DIM), slot)
    if attention:
        k = rope((h @ w["k"]).reshape(batch, KV_HEADS, HEAD_DIM), slot)
        v = (h @ w["v"]).reshape(batch, KV_HEADS, HEAD_DIM)
        cache = tuple(
            jax.lax.dynamic_update_slice(buf, new[None, :, :, None], (layer, 0, 0, slot, 0))
            for buf, new in zip(cache, (k, v), strict=True)
        )
        keys, values = (jax.lax.dynamic_index_in_dim(buf, layer, keepdims=False) for buf in cache)
        q = q.reshape(batch, KV_HEADS, HEADS // KV_HEADS, HEAD_DIM)
        scores = jnp.einsum("BKGH,BKSH->BKGS", q, keys) * HEAD_DIM**-0.5
        live = jnp.arange(keys.shape[2]) <= slot
        probs = jax.nn.softmax(jnp.where(live, scores, -1e30), -1)
        q = jnp.einsum("BKGS,BKSH->BKGH", probs, values)
    x = x + q.reshape(batch, -1) @ w["o"]
    h = rms_norm(x, w["mlp_norm"])
    return x + (jax.nn.silu(h @ w["gate"]) * (h @ w["up"])) @ w["down"], cache


def decode_loop(per_layer: bool, attention: bool, steps: int):
    """A jitted loop of `steps` greedy steps: (weights, embedding, cache) -> (tokens, cache)."""

    def step(weights, embedding, cache, token, slot):
        x = embedding[token]
        if per_layer:  # weights: {name: [array per layer]}
            for i in range(LAYERS):
                layer = {name: arrays[i] for name, arrays in weights.items()}
                x, cache = block(x, layer, cache, i, slot, attention)
        else:  # weights: {name: [L, ...]}

            def body(carry, xs):
                x, cache = carry
                layer, i = xs
                return block(x, layer, cache, i, slot, attention), None

            (x, cache), _ = jax.lax.scan(body, (x, cache), (weights, jnp.arange(LAYERS)))
        return jnp.argmax(x @ embedding.T, -1).astype(jnp.int32), cache

    @jax.jit
    def run(weights, embedding, cache):
        batch = cache[0].shape[1]

        def body(i, carry):
            token, cache = carry
            return step(weights, embedding, cache, token, i + 100)

        return jax.lax.fori_loop(0, steps, body, (jnp.zeros((batch,), jnp.int32), cache))

    return run


def measure(batch: int, args: argparse.Namespace) -> dict[str, float]:
    """ms per step of each variant, medians of --repeats; checks their greedy tokens agree."""
    stacked, embedding = random_weights()
    per_layer = {name: [w[i] for i in range(LAYERS)] for name, w in stacked.items()}
    shape = (LAYERS, batch, KV_HEADS, args.slots, HEAD_DIM)
    cache = (jnp.zeros(shape), jnp.zeros(shape))
    results, tokens = {}, {}
    for split in (False, True):
        for attention in (True, False):
            name = ("per_layer" if split else "scan") + ("" if attention else "_no_attention")
            run = decode_loop(split, attention, args.steps)
            weights = per_layer if split else stacked
            tokens[name] = np.asarray(jax.block_until_ready(run(weights, embedding, cache))[0])
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                jax.block_until_ready(run(weights, embedding, cache))
                times.append(time.perf_counter() - start)
            results[name] = statistics.median(times) / args.steps * 1e3
    for attention in ("", "_no_attention"):
        if not np.array_equal(tokens["scan" + attention], tokens["per_layer" + attention]):
            raise SystemExit(f"batch {batch}: per_layer{attention} tokens differ from scan's")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--slots", type=int, default=320, help="cache length (P + N)")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    if args.slots < args.steps + 100:
        parser.error(f"--slots {args.slots}: needs >= --steps + 100 = {args.steps + 100}")
    for batch in args.batch_sizes:
        figures = measure(batch, args)
        print(f"batch {batch}: " + ", ".join(f"{k} {v:.3f} ms/step" for k, v in figures.items()))


if __name__ == "__main__":
    main()
