"""Tokens/s of the packed pretraining pipeline on tiny_shakespeare with a 4k-vocab BPE.

    python benchmarks/data_pipeline.py --local-copy ../shared/data/tinyshakespeare.txt

Trains the tokenizer (or loads --tokenizer), prepares the tiny_shakespeare preset to
array_record in a temporary data_dir, then times `pretrain_dataset` end to end (read,
tokenize, pack, batch) after one warm-up batch. Prints each repeat and the median of
the repeats: tokens/s counts every [B, T] slot; "fill" is the share of slots holding a
real (trained) token.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.tokenizer import load_tokenizer, train_tokenizer, training_sentences
from train.data.builders import open_source
from train.data.pipelines import DataOptions, pretrain_dataset, tokens_in


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--local-copy", required=True, help="tinyshakespeare.txt")
    p.add_argument("--tokenizer", default=None, help="tokenizer dir (default: train a 4k BPE)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batches", type=int, default=100)
    p.add_argument("--packing", default="first_fit", choices=["first_fit", "concat_split"])
    p.add_argument("--num-threads", type=int, default=2)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3)
    return p.parse_args()


def time_pipeline(source, tokenizer, args: argparse.Namespace) -> tuple[float, float]:
    """(tokens/s over `args.batches` batches after a warm-up batch, fill fraction)."""
    options = DataOptions(num_threads=args.num_threads, num_workers=args.num_workers)
    it = iter(
        pretrain_dataset(source, tokenizer, args.batch_size, args.seq_len, options, args.packing)
    )
    next(it)
    slots = real = 0
    start = time.perf_counter()
    for _ in range(args.batches):
        batch = next(it)
        slots += batch["inputs"].size
        real += tokens_in(batch)
    elapsed = time.perf_counter() - start
    it.close()
    return slots / elapsed, real / slots


def main() -> None:
    args = parse_args()
    if args.tokenizer:
        tokenizer = load_tokenizer(args.tokenizer)
    else:
        with open(args.local_copy, encoding="utf-8") as f:
            tokenizer = train_tokenizer(training_sentences(f), 4096, "bpe")
    with tempfile.TemporaryDirectory() as data_dir:
        source = open_source(
            "text", name="tiny_shakespeare", data_dir=data_dir, local_copy=args.local_copy
        )
        print(f"{len(source)} documents, vocab {tokenizer.vocab_size}, B={args.batch_size} "
              f"T={args.seq_len} packing={args.packing} threads={args.num_threads} "
              f"workers={args.num_workers}")  # fmt: skip
        rates, fills = [], []
        for r in range(args.repeats):
            rate, fill = time_pipeline(source, tokenizer, args)
            rates.append(rate)
            fills.append(fill)
            print(f"repeat {r}: {rate:,.0f} tokens/s (fill {fill:.3f})")
    print(f"median: {statistics.median(rates):,.0f} tokens/s, fill {statistics.median(fills):.3f}")


if __name__ == "__main__":
    main()
