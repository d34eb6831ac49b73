"""TFDS builders for local files, the tiny_shakespeare preset, and opening any source.

Decisions:
- Every builder prepares to array_record and is read back with `as_data_source` /
  `tfds.data_source`: random access, no TensorFlow (measured: prepare and read work with
  TF absent). Records are stored normalized (see `records.py`): conversations as parallel
  `roles`/`contents` sequences, so SFT, ranked and prompt data share one layout.
- Builders are not registered in the TFDS catalog (skip_registration); they are
  configured per call. The config name is `<first file stem>_<hash>`, the hash covering
  the absolute paths, sizes and mtimes of the inputs and the options, so edited files
  are prepared again instead of silently reusing stale data.
- Bad records follow the policy ("skip": counted, summary logged and written to
  `bad_records.json` beside the prepared data; "fail": raise naming file and line).
- `tiny_shakespeare` resolves to this project's preset, not the catalog builder: the same
  file (registered sha256) and the same 90/5/5 character split as the TFDS catalog, but
  each blank-line-separated speech is one document, so packing and per-host sharding
  have documents to work with. It accepts a local copy (checked against the sha256).
- Text documents longer than `records.MAX_DOC_CHARS` are stored as consecutive pieces,
  each a document of its own, so no record (and no read-ahead) grows with a huge line.
- In configs, `data.path` (local file, glob, or {split: glob}) wins over `data.name`.
- `Prepared.source` is a `RecordSource`: the records plus their bad-record policy and
  files, so the pipelines' length check (train/data/fit.py) applies the same policy and
  names an over-long record's `file:line`.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import jax
import numpy as np
import tensorflow_datasets as tfds
from jax.experimental import multihost_utils

from train.data import records as rec

KINDS = ("text", "sft", "ranked", "prompts")
TINY_SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
BAD_RECORDS_FILE = "bad_records.json"
PathsArg = str | Sequence[str] | Mapping[str, str | Sequence[str]]


def _conversation() -> dict[str, Any]:
    return {
        "roles": tfds.features.Sequence(tfds.features.Text()),
        "contents": tfds.features.Sequence(tfds.features.Text()),
    }


def features_for(kind: str) -> tfds.features.FeaturesDict:
    """The stored feature layout of each record kind."""
    if kind == "text":
        spec = {"text": tfds.features.Text()}
    elif kind in ("sft", "prompts"):
        spec = _conversation()
    elif kind == "ranked":
        spec = {
            **_conversation(),
            "responses": tfds.features.Sequence(tfds.features.Text()),
            "ranks": tfds.features.Sequence(np.int32),
        }
    else:
        raise ValueError(f"data kind {kind!r}: choose from {KINDS}")
    return tfds.features.FeaturesDict(spec)


@dataclasses.dataclass
class FilesConfig(tfds.core.BuilderConfig):
    """Which files make each split, and how to read them."""

    splits: tuple[tuple[str, tuple[str, ...]], ...] = ()
    doc_mode: str = "blank_line"  # text files only: file | blank_line | jsonl
    text_key: str = "text"  # text JSONL only
    bad_records: str = "skip"


class _FilesBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base: one split per file group; subclasses say how a file becomes records."""

    VERSION = tfds.core.Version("1.0.0")
    KIND = ""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.bad_records = rec.BadRecordLog(self.builder_config.bad_records)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"flaxlm {self.KIND} records from local files",
            features=features_for(self.KIND),
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator]:
        splits = self.builder_config.splits
        return {split: self._generate_examples(paths) for split, paths in splits}

    def _records(self, path: str) -> Iterator[tuple[int, rec.Record | rec.BadRecordError]]:
        return rec.jsonl_records(path, self.KIND)

    def _generate_examples(self, paths: Sequence[str]) -> Iterator[tuple[str, rec.Record]]:
        count = 0
        for file_index, path in enumerate(paths):
            last, piece = None, 0
            for line, record in self._records(path):
                if isinstance(record, rec.BadRecordError):
                    self.bad_records.handle(rec.BadRecordError(record.reason, f"{path}:{line}"))
                    continue
                count += 1
                # The pieces of a long document share its line: keys must stay unique.
                piece = piece + 1 if line == last else 0
                last = line
                yield f"{file_index}:{line}" + (f":{piece}" if piece else ""), record
        if not count:  # else TFDS fails later with a bare "No examples were yielded."
            why = self.bad_records.summary() if self.bad_records.total else "no records"
            raise ValueError(f"{', '.join(paths)}: no usable {self.KIND} records ({why})")


class TextFiles(_FilesBuilder, skip_registration=True):
    """Plain text: one document per file, per blank-line block, or per JSONL line."""

    name = "flaxlm_text"
    KIND = "text"

    def _records(self, path: str) -> Iterator[tuple[int, rec.Record | rec.BadRecordError]]:
        cfg = self.builder_config
        return rec.text_documents(path, cfg.doc_mode, cfg.text_key)


class SftJsonl(_FilesBuilder, skip_registration=True):
    """{"prompt", "response"} or {"messages": [...]} per line."""

    name = "flaxlm_sft"
    KIND = "sft"


class RankedJsonl(_FilesBuilder, skip_registration=True):
    """{"prompt", "responses", "ranking"} or {"prompt", "chosen", "rejected"} per line."""

    name = "flaxlm_ranked"
    KIND = "ranked"


class PromptsJsonl(_FilesBuilder, skip_registration=True):
    """{"prompt"} (a string or a list of messages) per line, for RL."""

    name = "flaxlm_prompts"
    KIND = "prompts"


BUILDERS: dict[str, type[_FilesBuilder]] = {
    "text": TextFiles,
    "sft": SftJsonl,
    "ranked": RankedJsonl,
    "prompts": PromptsJsonl,
}


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def shakespeare_splits(text: str) -> dict[str, str]:
    """The TFDS catalog's split of the corpus: first 90% of characters, then 5% and 5%."""
    i = int(len(text) * 0.9)
    train, rest = text[:i], text[i:]
    j = int(len(rest) * 0.5)
    return {"train": train, "validation": rest[:j], "test": rest[j:]}


def blank_line_blocks(text: str) -> list[str]:
    """Blocks of non-blank lines separated by blank lines (inner newlines kept)."""
    return [b.strip("\n") for b in re.split(r"\n[ \t]*\n", text) if b.strip()]


class TinyShakespeare(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """tiny_shakespeare, one document per speech; `local_copy` skips the download."""

    name = "flaxlm_tiny_shakespeare"
    VERSION = tfds.core.Version("1.0.0")

    def __init__(self, *, local_copy: str | None = None, **kwargs: Any):
        self._local_copy = local_copy
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="tiny_shakespeare (TFDS splits), one blank-line block per document",
            features=features_for("text"),
            homepage=TINY_SHAKESPEARE_URL,
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator]:
        path = self._local_copy or os.fspath(dl_manager.download(TINY_SHAKESPEARE_URL))
        digest = sha256_file(path)
        if digest != TINY_SHAKESPEARE_SHA256:
            raise ValueError(
                f"{path}: sha256 {digest} is not the registered tiny_shakespeare "
                f"checksum {TINY_SHAKESPEARE_SHA256}"
            )
        with open(path, encoding="utf-8") as f:
            parts = shakespeare_splits(f.read())
        return {split: self._generate_examples(text) for split, text in parts.items()}

    def _generate_examples(self, text: str) -> Iterator[tuple[int, rec.Record]]:
        for i, block in enumerate(blank_line_blocks(text)):
            yield i, {"text": block}


def expand_paths(pattern: str | Sequence[str]) -> tuple[str, ...]:
    """Absolute paths of the files matching a glob (or each glob of a list), sorted."""
    patterns = [pattern] if isinstance(pattern, str) else list(pattern)
    found: list[str] = []
    for p in patterns:
        matches = sorted(glob.glob(os.path.expanduser(p)))
        if not matches:
            raise FileNotFoundError(f"data.path: no file matches {p!r}")
        found += [os.path.abspath(m) for m in matches if os.path.isfile(m)]
    return tuple(found)


def split_paths(paths: PathsArg) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """A path/glob/list (-> the "train" split) or {split: path/glob/list}."""
    if isinstance(paths, Mapping):
        return tuple((split, expand_paths(p)) for split, p in sorted(paths.items()))
    return (("train", expand_paths(paths)),)


def config_name(kind: str, splits: Sequence[tuple[str, Sequence[str]]], **options: Any) -> str:
    """`<stem>_<hash>`: the hash covers the inputs (path, size, mtime) and the options."""
    files = [(p, os.path.getsize(p), os.stat(p).st_mtime_ns) for _, ps in splits for p in ps]
    key = json.dumps([kind, splits, files, options], sort_keys=True, default=str)
    stem = os.path.splitext(os.path.basename(splits[0][1][0]))[0] if files else "empty"
    stem = re.sub(r"[^a-z0-9]+", "_", stem.lower()).strip("_")[:40] or "data"
    return f"{stem}_{hashlib.sha256(key.encode()).hexdigest()[:10]}"


T = TypeVar("T")


def process_zero_first(make: Callable[[], T]) -> T:
    """`make()` (which prepares data under a data_dir) on process 0, then on the others.

    Two hosts preparing one shared TFDS directory at once collide on its final rename;
    this way the others find it prepared, and hosts with their own disks prepare their
    own copies. One process: just `make()`.
    """
    if jax.process_count() == 1:
        return make()
    first = make() if jax.process_index() == 0 else None
    multihost_utils.sync_global_devices("flaxlm: data prepared on process 0")
    return first if jax.process_index() == 0 else make()


def _content_key(record: Mapping[str, Any]) -> str:
    """A record's content as stored and as parsed alike (bytes or str, arrays or lists)."""

    def text(x: Any) -> str:
        return x.decode("utf-8") if isinstance(x, bytes) else str(x)

    parts = [[text(x) for x in record.get(k, ())] for k in ("roles", "contents", "responses")]
    return json.dumps([*parts, [int(r) for r in record.get("ranks", ())]])


class RecordSource:
    """The records of one prepared split (random access, like the ArrayRecordDataSource it
    wraps) plus what the pipelines' length check needs: the bad-record policy it was
    prepared under (`bad_records`), a `label` and `locate` (records -> `file:line`)."""

    def __init__(self, records: Any, kind: str, paths: Sequence[str], bad_records: str):
        self.records, self.kind, self.paths = records, kind, tuple(paths)
        self.bad_records = bad_records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.records[i]

    def __getitems__(self, indices: Sequence[int]) -> Sequence[dict[str, Any]]:
        return self.records.__getitems__(indices)

    @property
    def label(self) -> str:
        more = f" (+{len(self.paths) - 1} more files)" if len(self.paths) > 1 else ""
        return (self.paths[0] + more) if self.paths else "data"

    def locate(self, indices: Sequence[int]) -> dict[int, str]:
        """`file:line` of the records at `indices`, found by content in the source files
        (preparation stores records in TFDS's shuffled order, not the files'); one pass
        over the files, stopping once all are found. Records not found are left out."""
        found: dict[int, str] = {}
        if self.kind == "text":  # documents are stored in pieces: not matched
            return found
        wanted: dict[str, list[int]] = {}
        for i in indices:
            wanted.setdefault(_content_key(self.records[i]), []).append(i)
        for path in self.paths:
            for line, record in rec.jsonl_records(path, self.kind):
                if isinstance(record, rec.BadRecordError):
                    continue
                waiting = wanted.get(_content_key(record))
                if waiting:
                    found[waiting.pop(0)] = f"{path}:{line}"
                    if len(found) == len(indices):
                        return found
        return found


@dataclasses.dataclass
class Prepared:
    """A prepared builder and the bad-record summary of its preparation."""

    builder: tfds.core.DatasetBuilder
    bad_records: dict[str, Any]

    def source(self, split: str = "train") -> RecordSource:
        """Random-access records of one split (an ArrayRecordDataSource, wrapped)."""
        config = self.builder.builder_config
        paths = dict(config.splits).get(split, ())
        records = self.builder.as_data_source(split=split)
        return RecordSource(records, self.builder.KIND, paths, config.bad_records)


def prepare(
    kind: str,
    paths: PathsArg,
    data_dir: str | None = None,
    doc_mode: str = "blank_line",
    text_key: str = "text",
    bad_records: str = "skip",
    name: str | None = None,
) -> Prepared:
    """Prepare local files of one record kind to array_record (once) and return them."""
    if kind not in BUILDERS:
        raise ValueError(f"data kind {kind!r}: choose from {KINDS}")
    if doc_mode not in rec.DOC_MODES:
        raise ValueError(f"doc_mode={doc_mode!r}: choose from {rec.DOC_MODES}")
    splits = split_paths(paths)
    options = {"doc_mode": doc_mode, "text_key": text_key, "bad_records": bad_records}
    # The piece size is part of what gets stored: another size prepares again.
    name = name or config_name(kind, splits, **options, max_doc_chars=rec.MAX_DOC_CHARS)
    config = FilesConfig(name=name, splits=splits, **options)

    def build() -> tfds.core.DatasetBuilder:  # constructed after any earlier preparation
        made = BUILDERS[kind](config=config, data_dir=data_dir, file_format="array_record")
        made.download_and_prepare()
        return made

    builder = process_zero_first(build)
    summary_path = os.path.join(os.fspath(builder.data_dir), BAD_RECORDS_FILE)
    log = builder.bad_records
    if log.counts or not os.path.exists(summary_path):  # generated now: record the summary
        summary = {"total": log.total, "counts": dict(log.counts), "examples": log.examples}
        with open(summary_path, "w") as f:
            json.dump(summary, f, indent=2)
        if log.total:
            logging.warning("%s %s: %s", kind, config.name, log.summary())
    with open(summary_path) as f:
        return Prepared(builder, json.load(f))


def open_source(
    kind: str,
    path: PathsArg | None = None,
    name: str | None = None,
    split: str = "train",
    data_dir: str | None = None,
    local_copy: str | None = None,
    download: bool = True,
    **prepare_kwargs: Any,
) -> Sequence[dict[str, Any]]:
    """The records of `split`: from local files (`path` wins) or a TFDS dataset `name`.

    `name="tiny_shakespeare"` is the preset above (with `local_copy` if given); any
    other name is a TFDS catalog dataset read with `tfds.data_source` (array_record),
    for `kind="text"` only, with the text under the pipeline's `text_key`.
    """
    if path:
        return prepare(kind, path, data_dir, **prepare_kwargs).source(split)
    if not name:
        raise ValueError("data: set data.path (a local file or glob) or data.name (TFDS)")
    if kind != "text":
        raise ValueError(f"data.name={name!r}: catalog datasets serve kind='text' only")
    if name == "tiny_shakespeare":

        def build() -> tfds.core.DatasetBuilder:
            made = TinyShakespeare(
                local_copy=local_copy, data_dir=data_dir, file_format="array_record"
            )
            made.download_and_prepare()
            return made

        return process_zero_first(build).as_data_source(split=split)
    return process_zero_first(
        lambda: tfds.data_source(
            name,
            split=split,
            data_dir=data_dir,
            download=download,
            builder_kwargs={"file_format": "array_record"},
        )
    )
