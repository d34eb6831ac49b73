"""Can XLA on CPU decode faster from int8 weights? The weight matmuls of one SmolLM2-135M
decode step (30 layers of q, k, v, o, gate, up, down and the tied 49152-row LM head, 134M
weights), in fp32 and in three int8 weight-only forms, per-output-channel scales:

- f32:      x @ w                                        (538 MB of weights per step)
- convert:  (x @ w_int8.astype(f32)) * scale             (135 MB read, if XLA fused it)
- reduce:   sum(x[:, :, None] * w_int8.astype(f32), 1) * scale   (a fusable elementwise form)
- int8_dot: dot(quantize(x), w_int8) in int32 * scales   (activations quantized per row)

    python benchmarks/int8_matvec.py --batch 1 --repeats 20

Prints the median milliseconds of each form (over `--repeats` calls, or at least 3 and
10 s for a slow form) and its ratio to fp32, measured in one run,
and the largest relative difference of its output from fp32's. Layers run under
`lax.scan` as in the model. XLA flags (e.g. --xla_cpu_experimental_ynn_fusion_type) can be
tried through XLA_FLAGS.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

LAYERS, D, FFN, VOCAB, KV = 30, 576, 1536, 49152, 192
SHAPES = {"q": (D, D), "k": (D, KV), "v": (D, KV), "o": (D, D)}
SHAPES |= {"gate": (D, FFN), "up": (D, FFN), "down": (FFN, D)}


def quantize(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per output channel (last axis): w ~ q * scale."""
    scale = np.abs(w).max(axis=-2, keepdims=True) / 127.0
    return np.round(w / scale).astype(np.int8), scale.astype(np.float32)


def matmuls() -> dict:
    def f32(x, w):
        return x @ w

    def convert(x, w):
        q, scale = w
        return (x @ q.astype(jnp.float32)) * scale[0]

    def reduce(x, w):
        q, scale = w
        return jnp.sum(x[:, :, None] * q.astype(jnp.float32), axis=1) * scale[0]

    def int8_dot(x, w):
        q, scale = w
        x_scale = jnp.max(jnp.abs(x), axis=-1, keepdims=True) / 127.0 + 1e-12
        xq = jnp.round(x / x_scale).astype(jnp.int8)
        out = jax.lax.dot(xq, q, preferred_element_type=jnp.int32)
        return out.astype(jnp.float32) * x_scale * scale[0]

    return {"f32": f32, "convert": convert, "reduce": reduce, "int8_dot": int8_dot}


def make_step(matmul):
    """One decode step's weight matmuls, with a residual stream between them."""

    def layer(x, w):
        attn = matmul(x, w["q"]) + jnp.tile(matmul(x, w["k"]) + matmul(x, w["v"]), 3)
        x = x + 0.1 * matmul(attn, w["o"])
        hidden = jax.nn.silu(matmul(x, w["gate"])) * matmul(x, w["up"])
        x = x + 0.1 * matmul(hidden, w["down"])
        return x / jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6), None

    @jax.jit
    def step(x, layers, head):
        x, _ = jax.lax.scan(layer, x, layers)
        return matmul(x, head)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    layers = {n: rng.normal(0, D**-0.5, (LAYERS, *s)).astype(np.float32) for n, s in SHAPES.items()}
    head = rng.normal(0, D**-0.5, (D, VOCAB)).astype(np.float32)
    x = jnp.asarray(rng.normal(size=(args.batch, D)).astype(np.float32))
    weights = {"f32": (layers, head)}
    int8 = ({n: quantize(w) for n, w in layers.items()}, quantize(head))
    weights |= dict.fromkeys(("convert", "reduce", "int8_dot"), int8)
    times, reference = {}, None
    for name, matmul in matmuls().items():
        step = make_step(matmul)
        w = jax.tree.map(jnp.asarray, weights[name])
        out = np.asarray(step(x, *w))  # compile
        reference = out if reference is None else reference
        runs = []
        while len(runs) < args.repeats and (len(runs) < 3 or sum(runs) < 10.0):
            start = time.perf_counter()
            step(x, *w).block_until_ready()
            runs.append(time.perf_counter() - start)
        times[name] = float(np.median(runs))
        diff = np.max(np.abs(out - reference)) / np.max(np.abs(reference))
        print(
            f"{name:9s} batch {args.batch}: {times[name] * 1e3:8.2f} ms/step "
            f"({times[name] / times['f32']:.2f}x fp32's time), max rel. diff from fp32 {diff:.4f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
