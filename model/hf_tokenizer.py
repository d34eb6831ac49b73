"""The flaxlm sentencepiece tokenizer as Hugging Face tokenizer files.

`write_hf_tokenizer` writes, next to the exported model:
  tokenizer.model          the sentencepiece model, byte for byte,
  tokenizer.json           the same tokenizer for the `tokenizers` library,
  tokenizer_config.json    class, special tokens, added tokens, chat template,
  special_tokens_map.json  pad/unk/bos/eos.

Decisions:
- tokenizer.json is built here from the sentencepiece proto rather than left to the
  converter inside `transformers`, whose behaviour differs between versions (4.x converts
  with its LlamaConverter, 5.x rebuilds every Llama tokenizer as BPE, which breaks unigram
  models). BPE merges are the pairs (a, b) whose concatenation is a vocabulary piece,
  ranked by that piece's score: sentencepiece's BPE merges the adjacent pair whose merged
  piece scores highest, which is this rank order. Unigram keeps the piece scores;
  control, byte and user-defined pieces get a score below every normal piece, so Viterbi
  uses them only as sentencepiece does (bytes as fallback for unknown characters).
- Pre-tokenization is sentencepiece's whitespace escape only (" " -> "▁", no dummy
  prefix, no split), no normalizer: the flaxlm tokenizer trains with identity
  normalization and no dummy prefix, so ids and round trips match.
- `tokenizer_class` is LlamaTokenizer for BPE and char models; unigram models get the
  generic PreTrainedTokenizerFast (transformers 5.x's LlamaTokenizer is BPE only).
- The chat markers and "\\n" are added tokens (matched in raw text, as sentencepiece's
  user-defined symbols are) that decode to their text; pad/unk/bos/eos are special.
  One known difference: the literal text "<s>" (or "</s>", "<pad>", "<unk>") encodes to
  the special id in transformers and to ordinary pieces in sentencepiece.
- `add_bos_token` is on: flaxlm prepends BOS to every pretraining document and chat, so
  `tokenizer(text)` gives the ids the model saw; `add_special_tokens=False` gives exactly
  `Tokenizer.encode`. The chat template renders `Tokenizer.encode_chat`'s layout.
"""

from __future__ import annotations

import json
import os
from typing import Any

from sentencepiece import sentencepiece_model_pb2

from model.tokenizer import (
    BOS_ID,
    EOS_ID,
    MODEL_FILE,
    PAD_ID,
    ROLE_IDS,
    SYSTEM_ID,
    UNK_ID,
    USER_DEFINED_SYMBOLS,
    Tokenizer,
)

SPACE = "\u2581"  # sentencepiece's escaped space "▁"
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE = 1, 2, 3, 4, 6  # ModelProto.SentencePiece.Type
UNIGRAM, BPE, WORD, CHAR = 1, 2, 3, 4  # TrainerSpec.ModelType
SPECIAL = {PAD_ID: "pad_token", UNK_ID: "unk_token", BOS_ID: "bos_token", EOS_ID: "eos_token"}
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] not in " + repr(sorted(ROLE_IDS)) + " %}"
    "{{ raise_exception('role ' + message['role'] + ' is not one of system, user, assistant') }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def parse_proto(tokenizer: Tokenizer) -> Any:
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(tokenizer.model_proto)
    return proto


def bpe_merges(pieces: list[tuple[str, float, int]]) -> list[tuple[str, str]]:
    """(piece, score, type) in id order -> BPE merges, highest-priority first.

    Every split of a normal piece into two vocabulary pieces is a merge, ranked by the
    merged piece's score (descending), then by the ids of the parts.
    """
    ids = {p: i for i, (p, _, kind) in enumerate(pieces) if kind in (NORMAL, UNKNOWN)}
    ranked = []
    for i, (piece, score, kind) in enumerate(pieces):
        if kind != NORMAL or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in ids and right in ids:
                ranked.append((-score, i, ids[left], ids[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def tokenizer_json(tokenizer: Tokenizer) -> str:
    """The `tokenizers` serialization of `tokenizer` (see the module doc for the mapping)."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors
    from tokenizers import Tokenizer as HFTokenizer

    proto = parse_proto(tokenizer)
    pieces = [(p.piece, p.score, p.type) for p in proto.pieces]
    kind = proto.trainer_spec.model_type
    if kind == UNIGRAM:
        floor = min((s for _, s, t in pieces if t == NORMAL), default=0.0) - 100.0
        vocab = [(p, s if t == NORMAL else floor) for p, s, t in pieces]
        model = models.Unigram(vocab, unk_id=UNK_ID, byte_fallback=True)
    elif kind in (BPE, CHAR):
        vocab = {p: i for i, (p, _, _) in enumerate(pieces)}
        merges = bpe_merges(pieces) if kind == BPE else []
        model = models.BPE(
            vocab, merges, unk_token=pieces[UNK_ID][0], fuse_unk=True, byte_fallback=True
        )
    else:
        raise ValueError(f"sentencepiece model_type {kind} has no Hugging Face equivalent")
    hf = HFTokenizer(model)
    hf.normalizer = None
    hf.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement=SPACE, prepend_scheme="never", split=False
    )
    hf.decoder = decoders.Sequence(
        [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    bos = pieces[BOS_ID][0]
    hf.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, BOS_ID)]
    )
    hf.add_special_tokens([AddedToken(pieces[i][0], normalized=False) for i in sorted(SPECIAL)])
    hf.add_tokens([AddedToken(s, normalized=False) for s in USER_DEFINED_SYMBOLS])
    return hf.to_str(pretty=True)


def added_tokens(tokenizer: Tokenizer) -> dict[str, dict[str, Any]]:
    """`added_tokens_decoder` of tokenizer_config.json: specials, chat markers and "\\n"."""
    entries = {i: (tokenizer.id_to_piece(i), True) for i in sorted(SPECIAL)}
    entries |= {SYSTEM_ID + k: (s, False) for k, s in enumerate(USER_DEFINED_SYMBOLS)}
    return {
        str(i): {
            "content": content,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "single_word": False,
            "special": special,
        }
        for i, (content, special) in entries.items()
    }


def special_tokens_map(tokenizer: Tokenizer) -> dict[str, str]:
    return {name: tokenizer.id_to_piece(i) for i, name in SPECIAL.items()}


def tokenizer_config(tokenizer: Tokenizer, model_max_length: int) -> dict[str, Any]:
    unigram = parse_proto(tokenizer).trainer_spec.model_type == UNIGRAM
    return {
        "tokenizer_class": "PreTrainedTokenizerFast" if unigram else "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "add_prefix_space": False,
        "legacy": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "padding_side": "left",
        "sp_model_kwargs": {},
        "added_tokens_decoder": added_tokens(tokenizer),
        "chat_template": CHAT_TEMPLATE,
        **special_tokens_map(tokenizer),
    }


def write_hf_tokenizer(tokenizer: Tokenizer, directory: str | os.PathLike, max_len: int) -> None:
    """Write the four tokenizer files into `directory` (see the module doc)."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, MODEL_FILE), "wb") as f:
        f.write(tokenizer.model_proto)
    with open(os.path.join(directory, "tokenizer.json"), "w") as f:
        f.write(tokenizer_json(tokenizer))
    for name, obj in (
        ("tokenizer_config.json", tokenizer_config(tokenizer, max_len)),
        ("special_tokens_map.json", special_tokens_map(tokenizer)),
    ):
        with open(os.path.join(directory, name), "w") as f:
            json.dump(obj, f, indent=2, ensure_ascii=False)
            f.write("\n")
