"""Prefill over the prompt's own keys against a read of the whole cache buffer.

A prefill (`cache_index` the Python int 0) attends over the T prompt keys; the same call
with a traced index reads the whole [S]-slot buffer, as every decode step does. Both
programs are compiled in one process and timed interleaved; the script also prints the
largest logit and live-cache differences between them.

    python benchmarks/prefill.py

Shapes: the demo pipeline's char model (d128 x 3 layers) at batch 32 with 16- and
24-slot prompts and 10 new tokens, and batch 8 with 64-slot prompts and 24 new tokens.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from configs import pipeline
from model import generate as gen
from model.config import ModelConfig
from model.transformer import Transformer, init_cache

# The demo pipeline's char model (its tokenizer's 384 ids, fp32), with room for 64 + 24.
CHAR_MODEL = ModelConfig(
    **{**pipeline.CHAR_MODEL, "vocab_size": 384, "max_seq_len": 128, "dtype": "float32"}
)
SHAPES = ((32, 16, 10), (32, 24, 10), (8, 64, 24))  # batch, prompt slots, new tokens
REPEATS = 31


def prefill_fn(model: Transformer, slots: int, traced_index: bool):
    """Jitted (params, prompts) -> (logits at the last slot, cache) of one prefill."""

    def run(params, tokens, positions, segment_ids):
        cache = init_cache(model.config, tokens.shape[0], slots, jnp.float32)
        index = jnp.int32(0) if traced_index else 0
        out = model.apply(
            {"params": params},
            tokens,
            positions,
            segment_ids,
            cache=cache,
            cache_index=index,
            last_logits_only=True,
        )
        return out.logits, out.cache

    return jax.jit(run)


def main() -> None:
    model = Transformer(CHAR_MODEL)
    params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    rng = np.random.default_rng(0)
    for batch, plen, new in SHAPES:
        prompts = gen.left_pad(
            [list(rng.integers(1, 300, plen - 1)) for _ in range(batch)], 0, plen
        )
        args = (params, *map(jnp.asarray, prompts))
        fns = {
            "buffer": prefill_fn(model, plen + new, traced_index=True),
            "own keys": prefill_fn(model, plen + new, traced_index=False),
        }
        outs = {name: jax.block_until_ready(fn(*args)) for name, fn in fns.items()}
        times: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(REPEATS):
            for name, fn in fns.items():
                start = time.perf_counter()
                jax.block_until_ready(fn(*args))
                times[name].append(time.perf_counter() - start)
        ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
        (buf_logits, buf_cache), (own_logits, own_cache) = outs["buffer"], outs["own keys"]
        live = (np.asarray(buf_cache["segment_ids"]) != 0)[None, :, None, :, None]
        cache_gap = max(
            float(np.max(np.where(live, np.abs(buf_cache[n] - own_cache[n]), 0))) for n in "kv"
        )
        print(
            f"batch {batch} prompt {plen} cache {plen + new}: buffer {ms['buffer']:.2f} ms, "
            f"own keys {ms['own keys']:.2f} ms, ratio {ms['buffer'] / ms['own keys']:.2f}x; "
            f"max |logit diff| {float(jnp.max(jnp.abs(buf_logits - own_logits))):.1e}, "
            f"live cache {cache_gap:.1e}"
        )


if __name__ == "__main__":
    main()
