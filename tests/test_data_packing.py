"""Packing: every pair once, documents never mixed, masks right, exact resume."""

import collections

import grain
import numpy as np
import pytest

from train.data.packing import PackIterDataset, assemble_row, concat_documents, shift_document

T = 16
EOS = 3


def make_docs(lengths, with_mask=False):
    """Document d has tokens d*1000 + 100 + i, then eos: every token names its document."""
    docs = []
    for d, n in enumerate(lengths):
        ids = [d * 1000 + 100 + i for i in range(n)] + [EOS]
        mask = [i % 2 for i in range(n + 1)] if with_mask else None
        docs.append(shift_document(ids, mask))
    return docs


def pack(docs, strategy, num_bins=4, per_chunk=3):
    chunks = [concat_documents(docs[i : i + per_chunk]) for i in range(0, len(docs), per_chunk)]
    ds = grain.MapDataset.source(chunks).to_iter_dataset(grain.ReadOptions(num_threads=0))
    return PackIterDataset(ds, T, strategy, num_bins)


LENGTHS = [3, 15, 16, 40, 1, 7, 9, 2, 33, 5, 12, 4, 16, 6, 8, 11, 2, 1, 20]


def doc_of(token):
    return (token - 100) // 1000 if token != EOS else None


@pytest.mark.parametrize("strategy", ["first_fit", "concat_split"])
def test_every_pair_exactly_once(strategy):
    docs = make_docs(LENGTHS)
    rows = list(pack(docs, strategy))
    got = collections.Counter()
    for row in rows:
        real = row["segment_ids"] > 0
        got.update(zip(row["inputs"][real].tolist(), row["targets"][real].tolist(), strict=True))
    want = collections.Counter()
    for doc in docs:
        want.update(zip(doc["inputs"].tolist(), doc["targets"].tolist(), strict=True))
    assert got == want
    assert sum(got.values()) == sum(LENGTHS)  # n tokens + eos = n pairs per document


@pytest.mark.parametrize("strategy", ["first_fit", "concat_split"])
def test_segments_hold_one_contiguous_document_piece(strategy):
    rows = list(pack(make_docs(LENGTHS), strategy))
    for row in rows:
        assert all(v.shape == (T,) for v in row.values())
        for seg in np.unique(row["segment_ids"][row["segment_ids"] > 0]):
            where = np.flatnonzero(row["segment_ids"] == seg)
            assert np.all(np.diff(where) == 1), "a segment is contiguous"
            inputs, targets = row["inputs"][where], row["targets"][where]
            assert len({doc_of(t) for t in inputs}) == 1, "one document per segment"
            assert np.all(np.diff(inputs) == 1), "consecutive tokens of that document"
            assert np.all(targets[:-1] == inputs[1:]), "targets are the next input"
            assert {doc_of(t) for t in targets} <= {doc_of(inputs[0]), None}
            np.testing.assert_array_equal(row["positions"][where], np.arange(where.size))
        pad = row["segment_ids"] == 0
        for key in ("inputs", "targets", "loss_mask", "positions"):
            assert not np.any(row[key][pad])
        # Padding only at the end of a row.
        assert not np.any(np.diff(pad.astype(int)) < 0)


@pytest.mark.parametrize("strategy", ["first_fit", "concat_split"])
def test_loss_mask_at_document_boundaries(strategy):
    docs = make_docs(LENGTHS, with_mask=True)
    mask_of = {}
    for doc in docs:
        mask_of.update(zip(doc["targets"].tolist(), doc["loss_mask"].tolist(), strict=False))
    for row in pack(docs, strategy):
        for i in np.flatnonzero(row["segment_ids"] > 0):
            target = int(row["targets"][i])
            if target == EOS:  # the last pair of a document: predicting eos is trained
                assert doc_of(int(row["inputs"][i])) is not None
            else:
                assert row["loss_mask"][i] == mask_of[target]
        ends = np.flatnonzero(np.diff(row["segment_ids"]) != 0)
        for i in ends:  # the pair before a boundary never targets the next segment's token
            if row["segment_ids"][i + 1]:
                assert row["targets"][i] != row["inputs"][i + 1] or row["targets"][i] == EOS


def test_concat_split_fills_rows_and_first_fit_chunks_long_documents():
    rows = list(pack(make_docs(LENGTHS), "concat_split"))
    assert all(np.all(r["segment_ids"] > 0) for r in rows[:-1])
    total = sum(LENGTHS)
    assert len(rows) == -(-total // T)
    first_fit = list(pack(make_docs([40]), "first_fit"))
    assert [int((r["segment_ids"] > 0).sum()) for r in first_fit] == [16, 16, 8]


@pytest.mark.parametrize("strategy", ["first_fit", "concat_split"])
def test_restore_at_every_row(strategy):
    docs = make_docs(LENGTHS * 2)
    reference = list(pack(docs, strategy))
    for k in range(len(reference)):
        it = iter(pack(docs, strategy))
        for _ in range(k):
            next(it)
        state = it.get_state()
        resumed = iter(pack(docs, strategy))
        resumed.set_state(state)
        rest = list(resumed)
        assert len(rest) == len(reference) - k
        for a, b in zip(rest, reference[k:], strict=True):
            for key in a:
                np.testing.assert_array_equal(a[key], b[key])


def test_assemble_row_and_shift_document():
    doc = shift_document([2, 10, 11, 3], [0, 0, 1, 1])
    np.testing.assert_array_equal(doc["inputs"], [2, 10, 11])
    np.testing.assert_array_equal(doc["targets"], [10, 11, 3])
    np.testing.assert_array_equal(doc["loss_mask"], [0, 1, 1])
    row = assemble_row([doc, shift_document([2, 20, 3])], 8)
    np.testing.assert_array_equal(row["segment_ids"], [1, 1, 1, 2, 2, 0, 0, 0])
    np.testing.assert_array_equal(row["positions"], [0, 1, 2, 0, 1, 0, 0, 0])
    np.testing.assert_array_equal(row["targets"], [10, 11, 3, 20, 3, 0, 0, 0])
    np.testing.assert_array_equal(row["loss_mask"], [0, 1, 1, 1, 1, 0, 0, 0])
    with pytest.raises(ValueError, match="do not fit"):
        assemble_row([doc, doc, doc], 8)
    with pytest.raises(ValueError, match=">= 2 tokens"):
        shift_document([3])
