"""A GGUF file's tokenizer as a standard Hugging Face tokenizer directory.

Written: `tokenizer.json` (built with the `tokenizers` library) and
`tokenizer_config.json` (`chat_template`, `bos_token`, `eos_token`, `pad_token`,
`unk_token` as token strings or null, `add_bos_token`, `add_eos_token`,
`model_max_length`), which `AutoTokenizer.from_pretrained(dir)` loads.

Supported: `tokenizer.ggml.model = "gpt2"` (byte-level BPE: tokens, merges, token types).
The pre-tokenizer follows `tokenizer.ggml.pre` the way llama.cpp does:

    gpt-2    the GPT-2 regex, then bytes -> unicode        ByteLevel(use_regex=True)
    smollm   every digit split off first, then as gpt-2   Digits(individual) + ByteLevel

(llama.cpp gives starcoder, refact, command-r and codeshell the same split as smollm.)
Other pre-tokenizers and sentencepiece (`"llama"`) tokenizers are refused by name.
Control tokens (token type 3) become special added tokens and user-defined ones (4)
plain added tokens, both matched before pre-tokenization as llama.cpp does; bos/eos are
prepended/appended by the post-processor only when `add_bos_token` / `add_eos_token`.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from typing import Any

from gguf import TokenType
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from model.gguf import GGUFError, GGUFModel

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
GPT2_PRE = ("gpt-2",)
DIGIT_SPLIT_PRE = ("smollm", "starcoder", "refact", "command-r", "codeshell")


def _pre_tokenizer(gguf: GGUFModel) -> Any:
    pre = gguf.get("tokenizer.ggml.pre", str, "default")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in GPT2_PRE:
        return byte_level
    if pre in DIGIT_SPLIT_PRE:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    raise GGUFError(
        f"{gguf.path}: tokenizer.ggml.pre={pre!r} is not supported (flaxlm builds "
        f"{', '.join(GPT2_PRE + DIGIT_SPLIT_PRE)})"
    )


def _special(gguf: GGUFModel, tokens: list[str], key: str) -> str | None:
    """The token string of `tokenizer.ggml.<key>_token_id`, None when absent."""
    index = gguf.get(f"tokenizer.ggml.{key}_token_id", int, None)
    if index is None:
        return None
    if not 0 <= index < len(tokens):
        raise GGUFError(
            f"{gguf.path}: tokenizer.ggml.{key}_token_id={index} is outside the "
            f"{len(tokens)} tokens"
        )
    return tokens[index]


def build_tokenizer(gguf: GGUFModel) -> tuple[Tokenizer, dict[str, Any]]:
    """(the `tokenizers.Tokenizer`, the tokenizer_config.json dict) of a GGUF file."""
    kind = gguf.get("tokenizer.ggml.model", str)
    if kind != "gpt2":
        raise GGUFError(
            f"{gguf.path}: tokenizer.ggml.model={kind!r} is not supported (flaxlm builds "
            "'gpt2' byte-level BPE tokenizers; sentencepiece 'llama' ones are not yet)"
        )
    tokens = gguf.get("tokenizer.ggml.tokens", list)
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        seen: set[str] = set()
        dup = next(t for t in tokens if t in seen or seen.add(t))
        raise GGUFError(f"{gguf.path}: tokenizer.ggml.tokens repeats {dup!r}")
    merges = []
    for merge in gguf.get("tokenizer.ggml.merges", list):
        pair = merge.split(" ")
        if len(pair) != 2:
            raise GGUFError(f"{gguf.path}: tokenizer.ggml.merges holds {merge!r}, not 'a b'")
        merges.append((pair[0], pair[1]))
    types = gguf.get("tokenizer.ggml.token_type", list, [TokenType.NORMAL] * len(tokens))
    if len(types) != len(tokens):
        raise GGUFError(
            f"{gguf.path}: tokenizer.ggml.token_type has {len(types)} entries for "
            f"{len(tokens)} tokens"
        )
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tokenizer.pre_tokenizer = _pre_tokenizer(gguf)
    tokenizer.decoder = decoders.ByteLevel()
    added = [
        AddedToken(tokens[i], special=t != TokenType.USER_DEFINED, normalized=False)
        for i, t in enumerate(types)
        if t in (TokenType.CONTROL, TokenType.USER_DEFINED, TokenType.UNKNOWN)
    ]
    tokenizer.add_tokens(added)  # the ids exist in the vocab: their ids are kept

    special = {key: _special(gguf, tokens, key) for key in ("bos", "eos", "padding", "unknown")}
    add_bos = gguf.get("tokenizer.ggml.add_bos_token", bool, False)
    add_eos = gguf.get("tokenizer.ggml.add_eos_token", bool, False)
    for flag, key in ((add_bos, "bos"), (add_eos, "eos")):
        if flag and special[key] is None:
            raise GGUFError(
                f"{gguf.path}: tokenizer.ggml.add_{key}_token is set but there is no "
                f"tokenizer.ggml.{key}_token_id"
            )
    template = ["$A"]
    if add_bos:
        template.insert(0, special["bos"])
    if add_eos:
        template.append(special["eos"])
    # A pair repeats the frame around the second sequence (as HF's Llama tokenizer does).
    pair = template + [("$B:1" if t == "$A" else f"{t}:1") for t in template]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=" ".join(template),
        pair=" ".join(pair),
        special_tokens=[(t, vocab[t]) for t in sorted({*template} - {"$A"})],
    )
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": special["bos"],
        "eos_token": special["eos"],
        "pad_token": special["padding"],
        "unk_token": special["unknown"],
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "chat_template": gguf.get("tokenizer.chat_template", str, None),
        "model_max_length": gguf.arch("context_length", int, 2048),
        "clean_up_tokenization_spaces": False,
    }
    return tokenizer, config


def tokenizer_files(gguf: GGUFModel) -> dict[str, bytes]:
    """File name -> bytes of the tokenizer directory (built in memory, nothing written)."""
    tokenizer, config = build_tokenizer(gguf)
    return {
        TOKENIZER_FILE: tokenizer.to_str(pretty=True).encode(),
        CONFIG_FILE: (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode(),
    }


def fingerprint(files: dict[str, bytes]) -> str:
    """sha256 (first 16 hex digits) of tokenizer.json's bytes then tokenizer_config.json's."""
    return hashlib.sha256(files[TOKENIZER_FILE] + files[CONFIG_FILE]).hexdigest()[:16]


def write_files(files: dict[str, bytes], directory: str | os.PathLike) -> pathlib.Path:
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (directory / name).write_bytes(data)
    return directory
