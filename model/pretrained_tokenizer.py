"""A pretrained model's own tokenizer: a Hugging Face tokenizer directory.

Reads `tokenizer.json` (the `tokenizers` library's format) and `tokenizer_config.json`
(`chat_template`, `bos_token`, `eos_token`, `pad_token`), as shipped with HF checkpoints
and as `flaxlm import-gguf` writes them. It offers the same interface as the
sentencepiece `model.tokenizer.Tokenizer` (encode, decode, encode_chat, special ids,
fingerprint, save), so every stage takes either.

Decisions:
- Special ids come from the files, never from constants: bos/eos/pad from
  tokenizer_config.json; the end-of-turn id (where a chat reply stops) is the first
  special token the chat template renders after an assistant message's content
  (`<|im_end|>` for ChatML, `<end_of_turn>` for Gemma, `<|eot_id|>` for Llama 3); pad
  falls back to eos when the checkpoint names none (pad positions are always masked).
- `encode_chat` renders the checkpoint's jinja template (sandboxed, as transformers
  renders it: trim_blocks, lstrip_blocks, `raise_exception`, `tojson`) and tokenizes the
  whole text once, so the ids are exactly what the model saw in training. The assistant
  mask comes from rendering the conversation one assistant turn at a time: the text the
  template adds for that turn after the generation prompt is the reply; the mask covers
  the tokens that start inside it, up to and including its end-of-turn token (the model
  learns to stop), not the newline a template puts after it.
- `encode` adds no special tokens; `encode_chat` adds none beyond what the template
  writes (templates write their own bos).
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # newer checkpoints keep the template apart
_PROBE = "\u2063probe\u2063"  # content no template rewrites; locates the end of a turn


class TokenizerFileError(ValueError):
    """A tokenizer directory that cannot be used: names the file and the problem."""


def is_pretrained_dir(path: str | os.PathLike) -> bool:
    """True for a directory holding an HF `tokenizer.json` (not flaxlm's info file)."""
    file = pathlib.Path(path) / TOKENIZER_FILE
    if not file.is_file():
        return False
    try:
        with open(file, encoding="utf-8") as f:
            return "model" in json.load(f)
    except (OSError, ValueError):
        return False


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json writes a token as a string or as {"content": ...}."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


class PretrainedTokenizer:
    """A loaded HF tokenizer directory with its chat template and special ids.

    Picklable (it carries the two files' text), so grain worker processes can use it.
    """

    def __init__(self, tokenizer_json: str, config_json: str, source: str = "<memory>"):
        from tokenizers import Tokenizer as _HFTokenizer

        self._files = (tokenizer_json, config_json)
        self.source = source
        try:
            self._tok = _HFTokenizer.from_str(tokenizer_json)
            self._config = json.loads(config_json)
        except Exception as err:  # the library raises its own exception types
            raise TokenizerFileError(f"tokenizer {source}: unreadable ({err})") from None
        self.chat_template: str | None = self._config.get("chat_template")
        if isinstance(self.chat_template, list):  # named templates: take "default"
            named = {t.get("name"): t.get("template") for t in self.chat_template}
            self.chat_template = named.get("default")
        self.bos_id = self._special_id("bos_token")
        eos = self._special_id("eos_token")
        if eos is None:
            raise TokenizerFileError(f"tokenizer {source}: {CONFIG_FILE} names no eos_token")
        self.eos_id: int = eos
        pad = self._special_id("pad_token")
        self.pad_id: int = eos if pad is None else pad
        added = json.loads(tokenizer_json).get("added_tokens", [])
        self._special = {int(t["id"]) for t in added if t.get("special")}
        self.end_of_turn_id: int = self._find_end_of_turn()
        self._markers: tuple[str, str] | None = None  # see _user_turn_markers

    # ------------------------------------------------------------------ loading helpers

    def _special_id(self, key: str) -> int | None:
        text = _token_text(self._config.get(key))
        if text is None:
            return None
        token_id = self._tok.token_to_id(text)
        if token_id is None:
            raise TokenizerFileError(
                f"tokenizer {self.source}: {CONFIG_FILE} {key}={text!r} is not in the vocabulary"
            )
        return int(token_id)

    def _find_end_of_turn(self) -> int:
        """The first special token the template writes after an assistant reply, else eos."""
        if not self.chat_template:
            return self.eos_id
        turn = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}]
        text = self.render(turn)
        after = text[text.index(_PROBE) + len(_PROBE) :] if _PROBE in text else ""
        for token_id in self._tok.encode(after, add_special_tokens=False).ids:
            if token_id in self._special:
                return int(token_id)
        return self.eos_id

    def __getstate__(self) -> dict[str, Any]:
        return {"files": self._files, "source": self.source}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(*state["files"], state["source"])

    # ------------------------------------------------------------------ the interface

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Ids that end a generated reply (and are dropped when decoding one)."""
        return tuple(sorted({self.eos_id, self.end_of_turn_id}))

    @property
    def fingerprint(self) -> str:
        """First 16 hex digits of sha256(tokenizer.json + tokenizer_config.json)."""
        digest = hashlib.sha256(self._files[0].encode() + self._files[1].encode())
        return digest.hexdigest()[:16]

    def encode(self, text: str) -> list[int]:
        """Text -> ids, no special tokens added."""
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        encodings = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [list(e.ids) for e in encodings]

    def encode_document(self, text: str) -> list[int]:
        """A pretraining document: bos (if the tokenizer has one), the text, eos."""
        head = [] if self.bos_id is None else [self.bos_id]
        return [*head, *self.encode(text), self.eos_id]

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text, special tokens dropped."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def id_to_piece(self, i: int) -> str:
        return self._tok.id_to_token(int(i)) or ""

    def render(self, messages: Sequence[Mapping[str, str]], add_generation_prompt=False) -> str:
        """The chat template applied to `messages`, as text."""
        if not self.chat_template:
            raise TokenizerFileError(
                f"tokenizer {self.source} has no chat template ({CONFIG_FILE} chat_template "
                f"or {CHAT_TEMPLATE_FILE}); a chat stage needs one"
            )
        return _template(self.chat_template).render(
            messages=list(messages),
            add_generation_prompt=add_generation_prompt,
            bos_token=_token_text(self._config.get("bos_token")) or "",
            eos_token=_token_text(self._config.get("eos_token")) or "",
        )

    def encode_chat(
        self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """A conversation -> ([L] int32 ids, [L] int32 mask of the assistant replies)."""
        for turn, message in enumerate(messages):
            if not isinstance(message.get("content"), str):
                raise ValueError(f"message {turn}: content must be a string")
        text = self.render(messages, add_generation_prompt)
        encoding = self._tok.encode(text, add_special_tokens=False)
        ids = np.asarray(encoding.ids, np.int32)
        mask = np.zeros(len(ids), np.int32)
        starts = np.asarray([start for start, _ in encoding.offsets], np.int64)
        for turn, message in enumerate(messages):
            if message.get("role") != "assistant":
                continue
            begin = len(self.render(messages[:turn], add_generation_prompt=True))
            through_reply = self.render(messages[: turn + 1])
            end = len(through_reply)
            if not text.startswith(through_reply):
                raise ValueError(
                    f"the chat template of {self.source} renders turn {turn} differently "
                    "inside a longer conversation; cannot locate the reply to mask"
                )
            inside = (starts >= begin) & (starts < end)
            reply = np.flatnonzero(inside)
            stop = np.flatnonzero(inside & (ids == self.end_of_turn_id))
            if reply.size:
                last = stop[0] if stop.size else reply[-1]
                mask[reply[0] : last + 1] = 1
        return ids, mask

    def last_user_text(self, ids: Iterable[int]) -> str:
        """The content of the last user turn of a chat prompt (ids as `encode_chat(...,
        add_generation_prompt=True)` writes them, left padding allowed): what a task's
        oracle reads as the prompt.

        The template's own text locates it: the decoded prompt must end with what the
        template writes after a user turn (e.g. `<|im_end|>\\n<|im_start|>assistant\\n`),
        and the content starts after the last occurrence of what it writes before one.
        """
        opener, closer = self._user_turn_markers()
        text = self._tok.decode([int(i) for i in ids], skip_special_tokens=False)
        start = text.rfind(opener)
        if start < 0 or not text.endswith(closer):
            raise ValueError(
                f"the prompt {text[-80:]!r} does not end with a user turn and the generation "
                f"prompt of {self.source}'s chat template ({opener!r} ... {closer!r})"
            )
        return text[start + len(opener) : len(text) - len(closer)]

    def _user_turn_markers(self) -> tuple[str, str]:
        """(text before, text after) a last user turn's content with a generation prompt:
        the common suffix of what precedes a first and a later user turn, and what follows."""
        if self._markers is None:
            user = {"role": "user", "content": _PROBE}
            first = self.render([user], add_generation_prompt=True)
            later = self.render(
                [user, {"role": "assistant", "content": "\u2063reply\u2063"}, user],
                add_generation_prompt=True,
            )
            heads = first[: first.index(_PROBE)], later[: later.rindex(_PROBE)]
            common = 0
            while common < min(map(len, heads)) and heads[0][-1 - common] == heads[1][-1 - common]:
                common += 1
            closer = first[first.index(_PROBE) + len(_PROBE) :]
            if not common:
                raise TokenizerFileError(
                    f"the chat template of {self.source} writes nothing before a user turn; "
                    "cannot locate a prompt's user text"
                )
            self._markers = (heads[0][len(heads[0]) - common :], closer)
        return self._markers

    def save(self, directory: str | os.PathLike) -> str:
        """Write tokenizer.json and tokenizer_config.json (byte for byte as loaded)."""
        os.makedirs(directory, exist_ok=True)
        for name, text in zip((TOKENIZER_FILE, CONFIG_FILE), self._files, strict=True):
            with open(os.path.join(directory, name), "w", encoding="utf-8") as f:
                f.write(text)
        return str(directory)


_TEMPLATES: dict[str, Any] = {}


def _template(source: str) -> Any:
    """A compiled, sandboxed jinja template (cached: templates are rendered per turn)."""
    if source not in _TEMPLATES:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise ValueError(f"chat template: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        env.filters["tojson"] = lambda x, indent=None: json.dumps(x, indent=indent)
        try:
            _TEMPLATES[source] = env.from_string(source)
        except jinja2.TemplateError as err:
            raise TokenizerFileError(f"chat template does not compile: {err}") from None
    return _TEMPLATES[source]


def load_pretrained_tokenizer(path: str | os.PathLike) -> PretrainedTokenizer:
    """Load an HF tokenizer directory; the template may sit in chat_template.jinja."""
    directory = pathlib.Path(path)
    try:
        tokenizer_json = (directory / TOKENIZER_FILE).read_text(encoding="utf-8")
        config_file = directory / CONFIG_FILE
        config_json = config_file.read_text(encoding="utf-8") if config_file.is_file() else "{}"
        config = json.loads(config_json)
    except (OSError, ValueError) as err:
        raise TokenizerFileError(f"tokenizer {directory}: {err}") from None
    template_file = directory / CHAT_TEMPLATE_FILE
    if not config.get("chat_template") and template_file.is_file():
        # The template joins the config; otherwise the file's bytes are kept (fingerprint).
        config["chat_template"] = template_file.read_text(encoding="utf-8")
        config_json = json.dumps(config, ensure_ascii=False, indent=2)
    return PretrainedTokenizer(tokenizer_json, config_json, source=str(directory))
