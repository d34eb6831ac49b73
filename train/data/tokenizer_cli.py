"""`flaxlm tokenizer`: train a sentencepiece tokenizer from text files or a TFDS dataset.

    flaxlm tokenizer --input ../shared/data/tinyshakespeare.txt --vocab-size 4096 --out tok/
    flaxlm tokenizer --input tiny_shakespeare --local-copy input.txt --vocab-size 4096 --out tok/
    flaxlm tokenizer --input c4 --data-dir gs://bucket/tfds --vocab-size 32000 --out tok/

--input is a file or glob (read line by line, never whole) or else a TFDS dataset name
(records streamed from array_record, the text under --text-key). Lines are sampled by
sentencepiece up to --max-sentences, so the corpus may be larger than memory.
"""

from __future__ import annotations

import argparse
import glob
import os
from collections.abc import Iterator

from tqdm import tqdm

from model.tokenizer import MODEL_TYPES, train_tokenizer, training_sentences


def file_lines(paths: list[str]) -> Iterator[str]:
    """Lines of each file, streamed; undecodable bytes become U+FFFD."""
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as f:
            yield from f


def tfds_texts(name: str, split: str, data_dir: str | None, text_key: str, local_copy: str | None):
    from train.data.builders import open_source  # tensorflow_datasets only when needed

    source = open_source("text", name=name, split=split, data_dir=data_dir, local_copy=local_copy)
    for i in range(len(source)):
        value = source[i][text_key]
        yield value.decode("utf-8", errors="replace") if isinstance(value, bytes) else value


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="flaxlm tokenizer", description=__doc__.splitlines()[0])
    p.add_argument("--input", required=True, help="text file/glob, or a TFDS dataset name")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--out", required=True, help="directory for tokenizer.model/.json")
    p.add_argument("--model-type", default="bpe", choices=MODEL_TYPES)
    p.add_argument("--split", default="train", help="TFDS split")
    p.add_argument("--data-dir", default=None, help="TFDS data_dir")
    p.add_argument("--text-key", default="text", help="TFDS feature holding the text")
    p.add_argument("--local-copy", default=None, help="local file for the tiny_shakespeare preset")
    p.add_argument("--max-sentences", type=int, default=2_000_000)
    p.add_argument("--num-threads", type=int, default=None)
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    paths = sorted(p for p in glob.glob(os.path.expanduser(args.input)) if os.path.isfile(p))
    if paths:
        texts, what = file_lines(paths), f"{len(paths)} file(s)"
    else:
        texts = tfds_texts(args.input, args.split, args.data_dir, args.text_key, args.local_copy)
        what = f"TFDS {args.input}:{args.split}"
    lines = tqdm(training_sentences(texts), desc=f"reading {what}", unit=" lines")
    tokenizer = train_tokenizer(
        lines,
        args.vocab_size,
        args.model_type,
        max_sentences=args.max_sentences,
        num_threads=args.num_threads,
    )
    lines.close()
    tokenizer.save(args.out)
    sample = "To be, or not to be 😀"
    print(f"{args.model_type} tokenizer with {tokenizer.vocab_size} pieces -> {args.out}")
    print(f"{sample!r} -> {tokenizer.encode(sample)}")
    print(f"set model.vocab_size={tokenizer.vocab_size}")
    return 0
