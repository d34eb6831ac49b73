"""SentencePiece tokenizer: training, fixed special ids, chat template, save/load.

Decisions:
- Fixed ids, the same in every tokenizer this project trains: pad=0, unk=1, bos=2, eos=3,
  then the user-defined symbols `<|system|>`=4, `<|user|>`=5, `<|assistant|>`=6,
  `<|end|>`=7 (end of turn) and "\\n"=8 (newline as one piece). Loading a model whose
  special pieces sit elsewhere is refused, so batches never silently change meaning.
- Exact round trip: byte fallback on (any character outside the vocabulary becomes its
  UTF-8 bytes), identity normalization, no dummy prefix, no whitespace collapsing. So
  `decode(encode(s)) == s` for every Python string of valid Unicode: emoji, control
  characters, U+FFFD, CJK, runs of spaces and tabs.
- User-defined symbols are matched in raw text too: a conversation whose content contains
  the literal text "<|user|>" encodes it as the marker. Callers that take untrusted text
  should strip these strings first.
- Training streams sentences through an iterator; sentencepiece keeps at most
  `max_sentences` of them (reservoir-sampled), so corpora larger than memory work.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import sentencepiece as spm

from model.pretrained_tokenizer import (
    PretrainedTokenizer,
    is_pretrained_dir,
    load_pretrained_tokenizer,
)

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
SYSTEM_ID, USER_ID, ASSISTANT_ID, END_ID, NEWLINE_ID = 4, 5, 6, 7, 8
USER_DEFINED_SYMBOLS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "\n")
ROLE_IDS = {"system": SYSTEM_ID, "user": USER_ID, "assistant": ASSISTANT_ID}
MODEL_TYPES = ("bpe", "unigram", "char")
MODEL_FILE = "tokenizer.model"
INFO_FILE = "tokenizer.json"
# Lines longer than this are cut into pieces for training (sentencepiece drops long lines).
_MAX_TRAIN_CHARS = 2048
_EXPECTED_PIECES = {
    PAD_ID: "<pad>",
    UNK_ID: "<unk>",
    BOS_ID: "<s>",
    EOS_ID: "</s>",
    **{SYSTEM_ID + i: s for i, s in enumerate(USER_DEFINED_SYMBOLS)},
}


class Tokenizer:
    """A loaded sentencepiece model with this project's special ids and chat template.

    Picklable (it carries the serialized model), so grain worker processes can use it.
    Its special ids are attributes, as on `PretrainedTokenizer` (model/pretrained_tokenizer.py),
    so stages read them from whichever tokenizer they hold.
    """

    bos_id: int = BOS_ID
    eos_id: int = EOS_ID
    pad_id: int = PAD_ID
    end_of_turn_id: int = END_ID
    stop_ids: tuple[int, ...] = (EOS_ID, END_ID)

    def __init__(self, model_proto: bytes, source: str = "<memory>"):
        self._proto = bytes(model_proto)
        self.source = source
        self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
        self._check_special_pieces()

    def _check_special_pieces(self) -> None:
        found = {i: self._sp.id_to_piece(i) for i in _EXPECTED_PIECES if i < self.vocab_size}
        if found != _EXPECTED_PIECES:
            raise ValueError(
                f"tokenizer {self.source}: special pieces {found} differ from the fixed ids "
                f"{_EXPECTED_PIECES}; train it with `flaxlm tokenizer`"
            )

    def __getstate__(self) -> dict[str, Any]:
        return {"proto": self._proto, "source": self.source}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["proto"], state["source"])

    @property
    def vocab_size(self) -> int:
        return int(self._sp.vocab_size())

    @property
    def model_proto(self) -> bytes:
        return self._proto

    @property
    def fingerprint(self) -> str:
        """First 16 hex digits of the model's sha256: names the tokenizer in data states."""
        return hashlib.sha256(self._proto).hexdigest()[:16]

    def encode(self, text: str) -> list[int]:
        """Text -> ids, no bos/eos added."""
        return self._sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.encode(list(texts))

    def encode_document(self, text: str) -> list[int]:
        """A pretraining document: bos, the text, eos."""
        return [BOS_ID, *self.encode(text), EOS_ID]

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text. pad/bos/eos decode to nothing; role markers to their text."""
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    def encode_chat(
        self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """Render a conversation to ([L] int32 ids, [L] int32 assistant mask).

        Layout: bos, then per turn `<|role|> content <|end|>`. The mask is 1 on the
        content of assistant turns and on their `<|end|>` (the model learns to stop),
        0 on role markers, bos and every other turn. With `add_generation_prompt` a
        final `<|assistant|>` (mask 0) asks the model to answer; generation stops at
        `<|end|>` (END_ID) or eos.
        """
        ids, mask = [BOS_ID], [0]
        for turn, message in enumerate(messages):
            role, content = message.get("role"), message.get("content")
            if role not in ROLE_IDS:
                raise ValueError(f"message {turn}: role {role!r} is not one of {list(ROLE_IDS)}")
            if not isinstance(content, str):
                raise ValueError(f"message {turn}: content must be a string, got {content!r}")
            body = self.encode(content)
            learn = int(role == "assistant")
            ids += [ROLE_IDS[role], *body, END_ID]
            mask += [0] + [learn] * (len(body) + 1)
        if add_generation_prompt:
            ids.append(ASSISTANT_ID)
            mask.append(0)
        return np.asarray(ids, np.int32), np.asarray(mask, np.int32)

    def last_user_text(self, ids: Iterable[int]) -> str:
        """The content of the last user turn of a chat prompt (ids as `encode_chat` writes
        them, left padding allowed): what a task's oracle reads as the prompt."""
        row = [int(i) for i in ids]
        if USER_ID not in row:
            raise ValueError("the prompt has no user turn (no <|user|> marker)")
        start = len(row) - row[::-1].index(USER_ID)
        end = row.index(END_ID, start) if END_ID in row[start:] else len(row)
        return self.decode(row[start:end])

    def save(self, directory: str | os.PathLike) -> str:
        """Write `tokenizer.model` and `tokenizer.json` (ids, fingerprint) into `directory`."""
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, MODEL_FILE), "wb") as f:
            f.write(self._proto)
        info = {
            "vocab_size": self.vocab_size,
            "fingerprint": self.fingerprint,
            "special_ids": {"pad": PAD_ID, "unk": UNK_ID, "bos": BOS_ID, "eos": EOS_ID},
            "user_defined_symbols": {s: SYSTEM_ID + i for i, s in enumerate(USER_DEFINED_SYMBOLS)},
        }
        with open(os.path.join(directory, INFO_FILE), "w") as f:
            json.dump(info, f, indent=2)
        return str(directory)


def load_tokenizer(path: str | os.PathLike) -> Tokenizer | PretrainedTokenizer:
    """Load a tokenizer directory: flaxlm's sentencepiece (`Tokenizer.save`, or a .model
    file) or a pretrained model's Hugging Face files (tokenizer.json +
    tokenizer_config.json, model/pretrained_tokenizer.py)."""
    path = os.fspath(path)
    if not os.path.isfile(os.path.join(path, MODEL_FILE)) and is_pretrained_dir(path):
        return load_pretrained_tokenizer(path)
    model_path = os.path.join(path, MODEL_FILE) if os.path.isdir(path) else path
    if not os.path.isfile(model_path):
        raise FileNotFoundError(f"no sentencepiece model at {model_path}")
    with open(model_path, "rb") as f:
        return Tokenizer(f.read(), source=model_path)


def check_vocab(
    model_vocab_size: int, tokenizer: Tokenizer | PretrainedTokenizer, allow_padding: bool = False
) -> None:
    """Refuse a model whose embedding table does not match the tokenizer.

    Exact equality by default. `allow_padding=True` accepts a larger model vocabulary
    (embedding rows padded, e.g. to a multiple of 128, are never produced as input).
    """
    n = tokenizer.vocab_size
    if model_vocab_size == n or (allow_padding and model_vocab_size > n):
        return
    raise ValueError(
        f"model.vocab_size={model_vocab_size} does not match the tokenizer "
        f"{tokenizer.source} with {n} pieces; set model.vocab_size={n} "
        f"(or retrain the tokenizer with --vocab-size {model_vocab_size})"
    )


def training_sentences(texts: Iterable[str], max_chars: int = _MAX_TRAIN_CHARS) -> Iterator[str]:
    """Split documents into non-empty lines of at most `max_chars` characters, lazily."""
    for text in texts:
        for line in text.splitlines():
            for start in range(0, len(line), max_chars):
                piece = line[start : start + max_chars]
                if piece.strip():
                    yield piece


def train_tokenizer(
    sentences: Iterable[str],
    vocab_size: int,
    model_type: str = "bpe",
    max_sentences: int = 2_000_000,
    num_threads: int | None = None,
    character_coverage: float = 0.9995,
) -> Tokenizer:
    """Train a sentencepiece model from an iterator of sentences (consumed once, lazily).

    `model_type="char"` treats `vocab_size` as an upper bound (the alphabet decides the
    size); bpe and unigram must reach it exactly, and sentencepiece raises if the corpus
    is too small. The vocabulary always holds the 9 fixed ids and 256 byte pieces.
    """
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type={model_type!r}: choose from {MODEL_TYPES}")
    minimum = len(_EXPECTED_PIECES) + 256 + 1
    if vocab_size < minimum:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: the fixed ids and 256 byte-fallback "
            f"pieces alone take {minimum - 1}"
        )
    writer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=writer,
        model_type=model_type,
        vocab_size=vocab_size,
        hard_vocab_limit=model_type != "char",
        pad_id=PAD_ID,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        user_defined_symbols=list(USER_DEFINED_SYMBOLS),
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        character_coverage=1.0 if model_type == "char" else character_coverage,
        input_sentence_size=max_sentences,
        shuffle_input_sentence=True,
        max_sentence_length=4 * _MAX_TRAIN_CHARS,
        num_threads=num_threads or os.cpu_count() or 1,
        minloglevel=2,
    )
    return Tokenizer(writer.getvalue(), source=f"<trained {model_type} {vocab_size}>")


# Either tokenizer: what stages, sampling and the data pipelines accept.
AnyTokenizer = Tokenizer | PretrainedTokenizer
