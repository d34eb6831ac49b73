"""Packing documents into fixed-length rows, as a checkpointable grain transformation.

A document arrives already shifted: equal-length 1-D arrays `inputs`, `targets`
(= the next token) and `loss_mask`, one entry per (input, target) pair. Packing moves
whole pairs, so no target ever comes from another document and the loss mask stays
right at every boundary. Each packed row is a dict of [T] arrays:

    inputs, targets   int32, 0 (pad) after the last piece
    loss_mask         float32, 0 on padding
    segment_ids       int32, 1, 2, ... per piece in the row, 0 on padding
    positions         int32, 0, 1, ... restarting at every piece

A piece is a document, or a part of one when it does not fit:
- "first_fit": documents longer than T are cut into pieces of T pairs; each piece goes
  into the first of `num_bins` open rows with room. When a piece fits no open row, the
  group of rows is emitted in order and a new group starts with that piece.
- "concat_split": pieces fill one row after another with no padding; a document that
  overflows a row continues at the start of the next.
Positions restart at 0 for every piece, including continuations: with rotary
embeddings only position differences matter, and attention never crosses rows.

Documents travel in chunks (`concat_documents`: the pairs of many documents
concatenated, plus their lengths): one grain element per chunk keeps per-element
overhead (reads, thread hand-off, worker IPC) off the per-document path.

Checkpointing: the state is (parent state before the chunk the current group starts in,
the document index and pair offset there, rows of the group already emitted). Restoring
re-reads at most one group's chunks and resumes at exactly the next row.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

STRATEGIES = ("first_fit", "concat_split")
PAIR_KEYS = ("inputs", "targets", "loss_mask")
Doc = dict[str, np.ndarray]


def shift_document(ids: Sequence[int], mask: Sequence[int] | None = None) -> Doc:
    """[L] tokens -> L-1 pairs: inputs ids[:-1], targets ids[1:], loss_mask = mask[1:].

    The mask of a pair is the mask of its target (it says whether predicting that
    token is trained); None means every target counts.
    """
    ids = np.asarray(ids, np.int32)
    if ids.ndim != 1 or ids.size < 2:
        raise ValueError(f"a document needs >= 2 tokens in one dimension, got shape {ids.shape}")
    weights = np.ones(ids.size, np.float32) if mask is None else np.asarray(mask, np.float32)
    if weights.shape != ids.shape:
        raise ValueError(f"mask shape {weights.shape} differs from ids shape {ids.shape}")
    return {"inputs": ids[:-1], "targets": ids[1:], "loss_mask": weights[1:]}


def concat_documents(docs: Sequence[Doc]) -> Doc:
    """Documents -> one chunk: their pairs concatenated, and `lengths` [n_docs] int32."""
    chunk = {k: np.concatenate([d[k] for d in docs]) for k in PAIR_KEYS}
    chunk["lengths"] = np.asarray([doc_length(d) for d in docs], np.int32)
    return chunk


def doc_length(doc: Doc) -> int:
    return int(doc["inputs"].shape[0])


def slice_document(doc: Doc, start: int, stop: int) -> Doc:
    return {k: doc[k][start:stop] for k in PAIR_KEYS}


def assemble_row(pieces: Sequence[Doc], seq_len: int) -> dict[str, np.ndarray]:
    """Concatenate pieces into one [T] row with segment ids 1..n and restarting positions."""
    lengths = [doc_length(p) for p in pieces]
    used = sum(lengths)
    if used > seq_len:
        raise ValueError(f"pieces of {used} pairs do not fit a row of {seq_len}")
    row = {
        "inputs": np.zeros(seq_len, np.int32),
        "targets": np.zeros(seq_len, np.int32),
        "loss_mask": np.zeros(seq_len, np.float32),
        "segment_ids": np.zeros(seq_len, np.int32),
        "positions": np.zeros(seq_len, np.int32),
    }
    if pieces:
        for key in PAIR_KEYS:
            row[key][:used] = np.concatenate([p[key] for p in pieces])
        row["segment_ids"][:used] = np.repeat(np.arange(1, len(pieces) + 1), lengths)
        starts = np.repeat(np.cumsum([0, *lengths[:-1]]), lengths)
        row["positions"][:used] = np.arange(used) - starts
    return row


class PackIterDataset(grain.IterDataset):
    """Packs a stream of document chunks into [T] rows (see the module docstring)."""

    def __init__(
        self,
        parent: grain.IterDataset,
        seq_len: int,
        strategy: str = "first_fit",
        num_bins: int = 64,
    ):
        super().__init__(parent)
        if strategy not in STRATEGIES:
            raise ValueError(f"packing={strategy!r}: choose from {STRATEGIES}")
        if seq_len < 1 or num_bins < 1:
            raise ValueError(f"seq_len={seq_len} and num_bins={num_bins} must be >= 1")
        self._seq_len, self._strategy, self._num_bins = seq_len, strategy, num_bins

    def __iter__(self) -> grain.DatasetIterator:
        return _PackIterator(self._parent.__iter__(), self._seq_len, self._strategy, self._num_bins)

    def __str__(self) -> str:
        return f"PackIterDataset(seq_len={self._seq_len}, strategy={self._strategy})"


class _PackIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, seq_len: int, strategy: str, num_bins: int):
        super().__init__(parent)
        self._seq_len, self._num_bins = seq_len, num_bins
        self._fill = self._fill_first_fit if strategy == "first_fit" else self._fill_concat
        self._reset()

    def _reset(self) -> None:
        self._chunk: Doc | None = None
        self._chunk_state: dict[str, Any] | None = None  # parent state before self._chunk
        self._starts = np.zeros(0, np.int64)  # first pair of each document in the chunk
        self._doc = 0  # current document in the chunk
        self._offset = 0  # pairs of that document already packed
        self._group_state: dict[str, Any] | None = None
        self._rows: list[dict[str, np.ndarray]] = []
        self._next_row = 0

    def _has_doc(self) -> bool:
        """Point at a document with unpacked pairs, reading chunks; False at the end."""
        while True:
            if self._chunk is not None:
                lengths = self._chunk["lengths"]
                while self._doc < lengths.size and self._offset >= lengths[self._doc]:
                    self._doc, self._offset = self._doc + 1, 0
                if self._doc < lengths.size:
                    return True
            state = copy.deepcopy(self._parent.get_state())
            try:
                chunk = next(self._parent)
            except StopIteration:
                self._chunk = None
                return False
            self._chunk, self._chunk_state, self._doc, self._offset = chunk, state, 0, 0
            self._starts = np.concatenate([[0], np.cumsum(chunk["lengths"][:-1])])

    def _remaining(self) -> int:
        return int(self._chunk["lengths"][self._doc]) - self._offset

    def _take(self, n: int) -> Doc:
        start = int(self._starts[self._doc]) + self._offset
        self._offset += n
        return slice_document(self._chunk, start, start + n)

    def _fill_first_fit(self) -> list[list[Doc]]:
        bins: list[list[Doc]] = []
        free = np.zeros(self._num_bins, np.int64)  # free slots; unopened bins have 0
        while self._has_doc():
            size = min(self._seq_len, self._remaining())
            fits = np.flatnonzero(free >= size)
            if fits.size:
                slot = int(fits[0])
            elif len(bins) < self._num_bins:
                slot = len(bins)
                bins.append([])
                free[slot] = self._seq_len
            else:
                break  # the group is full: this piece starts the next one
            bins[slot].append(self._take(size))
            free[slot] -= size
        return bins

    def _fill_concat(self) -> list[list[Doc]]:
        row: list[Doc] = []
        free = self._seq_len
        while free and self._has_doc():
            n = min(free, self._remaining())
            row.append(self._take(n))
            free -= n
        return [row] if row else []

    def _build_group(self) -> None:
        self._rows, self._next_row = [], 0
        if self._has_doc():
            self._group_state = {"parent": self._chunk_state, "doc": self._doc}
            self._group_state["offset"] = self._offset
            self._rows = [assemble_row(p, self._seq_len) for p in self._fill()]

    def __next__(self) -> dict[str, np.ndarray]:
        if self._next_row >= len(self._rows):
            self._build_group()
            if not self._rows:
                raise StopIteration
        row = self._rows[self._next_row]
        self._next_row += 1
        return row

    def get_state(self) -> dict[str, Any]:
        if self._group_state is None:  # nothing packed yet
            parent = copy.deepcopy(self._parent.get_state())
            return {"parent": parent, "doc": 0, "offset": 0, "row": 0}
        return {**copy.deepcopy(self._group_state), "row": self._next_row}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._reset()
        if not self._has_doc():
            return
        self._doc, self._offset = int(state["doc"]), int(state["offset"])
        self._build_group()
        self._next_row = int(state["row"])
