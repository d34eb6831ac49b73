"""Reading and validating raw records: text documents and JSONL lines.

Everything here streams (one line or one blank-line block in memory at a time) and is
pure Python, so the TFDS builders stay thin. A bad record raises `BadRecordError`; the
`BadRecordLog` applies the policy: "fail" re-raises it naming file and line, "skip"
counts it by reason and keeps a few examples for the summary.

Normalized record layouts (what the builders store):
- text:    {"text": str}                                  at most MAX_DOC_CHARS characters
- sft:     {"roles": [str], "contents": [str]}          a conversation, >= 1 assistant turn
- ranked:  {"roles", "contents"} (the prompt) + {"responses": [str] (K >= 2),
           "ranks": [int] (K)}; ranks[k] is the rank of responses[k], 0 = best, equal
           ranks are ties (dense: the distinct ranks are 0..m, m >= 1)
- prompts: {"roles", "contents"}                         ends with a user turn
"""

from __future__ import annotations

import collections
import dataclasses
import json
from collections.abc import Iterator
from typing import Any

POLICIES = ("skip", "fail")
# A text document longer than this is stored as consecutive pieces of at most this many
# characters, each trained as a document of its own (bos + piece + eos). Records are then
# bounded, so tokenizing one and the pipeline's read-ahead (DataOptions.prefetch x
# read_chunk records) hold bounded memory: a 10 MB line no longer becomes read_chunk
# copies of itself in one chunk (a one-document source repeats). 32 Ki characters are
# ~8k BPE tokens, more than any preset's context, and packing already cuts every
# document into rows of seq_len; the cost is a bos/eos pair every 32 Ki characters.
MAX_DOC_CHARS = 32 * 1024
DOC_MODES = ("file", "blank_line", "jsonl")
ROLES = ("system", "user", "assistant")
Record = dict[str, Any]


class BadRecordError(ValueError):
    """A record that cannot be used; `where` is "file:line" once known."""

    def __init__(self, reason: str, where: str = ""):
        super().__init__(f"{where}: {reason}" if where else reason)
        self.reason, self.where = reason, where


@dataclasses.dataclass
class BadRecordLog:
    """Applies the bad-record policy and keeps the counts for the summary."""

    policy: str = "skip"
    max_examples: int = 5
    counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    examples: list[str] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"bad_records={self.policy!r}: choose from {POLICIES}")

    def handle(self, error: BadRecordError) -> None:
        if self.policy == "fail":
            raise error
        self.counts[error.reason.split(":")[0]] += 1
        if len(self.examples) < self.max_examples:
            self.examples.append(str(error))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        if not self.total:
            return "no bad records"
        reasons = ", ".join(f"{n} x {r}" for r, n in self.counts.most_common())
        return f"skipped {self.total} bad records ({reasons}); e.g. " + " | ".join(self.examples)


def decode_utf8(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        bad = raw[e.start : e.start + 1]
        raise BadRecordError(f"invalid UTF-8: byte {e.start} is {bad!r}") from e


def check_text(value: Any, key: str) -> str:
    """A string that encodes to UTF-8 (JSON escapes can smuggle in lone surrogates)."""
    if not isinstance(value, str):
        raise BadRecordError(f"bad type: {key!r} must be a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise BadRecordError(f"invalid UTF-8: {key!r} holds a lone surrogate") from e
    return value


def read_lines(path: str) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw line without its newline), streamed."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            yield number, raw.rstrip(b"\r\n")


def jsonl_objects(path: str) -> Iterator[tuple[int, dict | BadRecordError]]:
    """(line, object) for each non-blank line; undecodable lines yield a BadRecordError."""
    for number, raw in read_lines(path):
        if not raw.strip():
            continue
        try:
            obj = json.loads(decode_utf8(raw))
            if not isinstance(obj, dict):
                raise BadRecordError(f"bad type: expected a JSON object, got {type(obj).__name__}")
            yield number, obj
        except json.JSONDecodeError as e:
            yield number, BadRecordError(f"invalid JSON: {e.msg} at column {e.colno}")
        except BadRecordError as e:
            yield number, e


def split_document(text: str, max_chars: int = MAX_DOC_CHARS) -> list[str]:
    """`text` in consecutive pieces of at most `max_chars` characters (joined, they give
    `text` back). A piece ends after the last space or newline of its second half when
    there is one, so words are rarely cut."""
    pieces, start = [], 0
    while len(text) - start > max_chars:
        stop = start + max_chars
        space = max(text.rfind(c, start + max_chars // 2, stop) for c in " \n")
        stop = space + 1 if space >= 0 else stop
        pieces.append(text[start:stop])
        start = stop
    pieces.append(text[start:])
    return pieces


def text_documents(
    path: str, mode: str, text_key: str = "text"
) -> Iterator[tuple[int, Record | BadRecordError]]:
    """(first line, {"text": ...}) per document of a text file; a document longer than
    MAX_DOC_CHARS comes as several records of the same line (`split_document`).

    mode "file": the whole file is one document; "blank_line": blocks separated by one
    or more blank lines (inner newlines kept); "jsonl": one `{text_key: str}` per line.
    """
    for line, record in _whole_documents(path, mode, text_key):
        if isinstance(record, BadRecordError):
            yield line, record
            continue
        for piece in split_document(record["text"]):
            yield line, {"text": piece}


def _whole_documents(
    path: str, mode: str, text_key: str
) -> Iterator[tuple[int, Record | BadRecordError]]:
    if mode == "file":
        with open(path, "rb") as f:
            raw = f.read()
        try:
            yield 1, {"text": decode_utf8(raw)}
        except BadRecordError as e:
            yield 1, e
    elif mode == "blank_line":
        yield from _blank_line_blocks(path)
    elif mode == "jsonl":
        for number, obj in jsonl_objects(path):
            if isinstance(obj, BadRecordError):
                yield number, obj
                continue
            try:
                yield number, {"text": check_text(_require(obj, text_key), text_key)}
            except BadRecordError as e:
                yield number, e
    else:
        raise ValueError(f"doc_mode={mode!r}: choose from {DOC_MODES}")


def _blank_line_blocks(path: str) -> Iterator[tuple[int, Record | BadRecordError]]:
    block: list[bytes] = []
    start = 0
    for number, raw in read_lines(path):
        if raw.strip():
            if not block:
                start = number
            block.append(raw)
            continue
        if block:
            yield start, _block_record(block)
            block = []
    if block:
        yield start, _block_record(block)


def _block_record(lines: list[bytes]) -> Record | BadRecordError:
    try:
        return {"text": decode_utf8(b"\n".join(lines))}
    except BadRecordError as e:
        return e


def _require(obj: dict, key: str) -> Any:
    if key not in obj:
        raise BadRecordError(f"missing key: {key!r} (keys present: {sorted(obj)})")
    return obj[key]


def parse_messages(value: Any, key: str = "messages") -> tuple[list[str], list[str]]:
    """A string (one user turn) or a list of {"role", "content"} -> (roles, contents)."""
    if isinstance(value, str):
        return ["user"], [check_text(value, key)]
    if not isinstance(value, list) or not value:
        raise BadRecordError(f"bad type: {key!r} must be a string or a non-empty list of messages")
    roles, contents = [], []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise BadRecordError(f"bad type: {key}[{i}] must be an object")
        role = _require(message, "role")
        if role not in ROLES:
            raise BadRecordError(f"bad role: {key}[{i}].role={role!r}, expected one of {ROLES}")
        roles.append(role)
        contents.append(check_text(_require(message, "content"), f"{key}[{i}].content"))
    return roles, contents


def parse_sft(obj: dict) -> Record:
    """{"prompt", "response"[, "system"]} or {"messages": [...]} -> a conversation."""
    if "messages" in obj:
        roles, contents = parse_messages(obj["messages"])
    else:
        roles, contents = parse_messages(_require(obj, "prompt"), "prompt")
        roles.append("assistant")
        contents.append(check_text(_require(obj, "response"), "response"))
        if "system" in obj:
            roles.insert(0, "system")
            contents.insert(0, check_text(obj["system"], "system"))
    if "assistant" not in roles:
        raise BadRecordError("no assistant turn: nothing to learn from")
    return {"roles": roles, "contents": contents}


def parse_ranked(obj: dict) -> Record:
    """{"prompt", "responses", "ranking"} or the pairwise {"prompt", "chosen", "rejected"}."""
    roles, contents = parse_messages(_require(obj, "prompt"), "prompt")
    if "responses" not in obj and "chosen" in obj:
        responses = [check_text(obj["chosen"], "chosen")]
        responses.append(check_text(_require(obj, "rejected"), "rejected"))
        return {"roles": roles, "contents": contents, "responses": responses, "ranks": [0, 1]}
    responses = _require(obj, "responses")
    if not isinstance(responses, list) or len(responses) < 2:
        raise BadRecordError("K < 2: 'responses' must be a list of at least 2 strings")
    responses = [check_text(r, f"responses[{i}]") for i, r in enumerate(responses)]
    ranks = _require(obj, "ranking")
    if (
        not isinstance(ranks, list)
        or len(ranks) != len(responses)
        or not all(isinstance(r, int) and not isinstance(r, bool) for r in ranks)
    ):
        raise BadRecordError(f"bad ranking: need {len(responses)} integer ranks, got {ranks!r}")
    if sorted(set(ranks)) != list(range(max(ranks) + 1)):
        raise BadRecordError(
            f"bad ranking: {ranks} is not a permutation of ranks 0..m (0 = best, "
            "equal ranks are ties)"
        )
    if max(ranks) == 0:
        raise BadRecordError("bad ranking: all responses tied, no preference pairs")
    return {"roles": roles, "contents": contents, "responses": responses, "ranks": ranks}


def parse_prompt(obj: dict) -> Record:
    """{"prompt": str | messages} (or {"messages": [...]}) ending with a user turn."""
    key = "messages" if "messages" in obj and "prompt" not in obj else "prompt"
    roles, contents = parse_messages(_require(obj, key), key)
    if roles[-1] != "user":
        raise BadRecordError(f"bad role: a prompt must end with a user turn, got {roles[-1]!r}")
    return {"roles": roles, "contents": contents}


PARSERS = {"sft": parse_sft, "ranked": parse_ranked, "prompts": parse_prompt}


def jsonl_records(path: str, kind: str) -> Iterator[tuple[int, Record | BadRecordError]]:
    """(line, normalized record or BadRecordError) for an SFT, ranked or prompts JSONL file."""
    parse = PARSERS[kind]
    for number, obj in jsonl_objects(path):
        if isinstance(obj, BadRecordError):
            yield number, obj
            continue
        try:
            yield number, parse(obj)
        except BadRecordError as e:
            yield number, e
