"""grain pipelines for every stage, per-process sharding, and global batch layout.

Each `*_dataset` function returns a `grain.IterDataset` of host-local batches (dicts of
numpy arrays, leading dim = the local batch size B). `iter(ds)` gives a
`grain.DatasetIterator`; `it.get_state()` is a JSON-serializable dict (saved in the
checkpoint) and `it.set_state(state)` resumes at exactly the next batch. The state is
stamped with the pipeline's settings (stage, shapes, seed, shard, tokenizer): restoring
it into a differently configured pipeline raises, naming the differing keys.

Batch formats (B = local batch, T = seq_len, K = max_responses):
- pretrain / sft: `inputs`, `targets` int32 [B, T]; `loss_mask` float32 [B, T];
  `segment_ids` int32 [B, T] (1, 2, ... per document in a row, 0 = padding);
  `positions` int32 [B, T] (restart at 0 per document). Pretraining: bos + text + eos,
  every target counts. SFT: the chat template, loss only on assistant tokens.
- ranked: `tokens` int32 [B, K, T] (prompt + response through the chat template, right
  padded); `segment_ids` [B, K, T] (1 on tokens, 0 on pads); `positions` [B, K, T];
  `completion_mask` float32 [B, K, T] (1 on the response and its `<|end|>`);
  `response_mask` float32 [B, K] (1 = a real response); `ranks` int32 [B, K] (0 = best,
  equal = tie, -1 = padding). The reward is read at index `segment_ids.sum(-1) - 1`.
  `pair_mask` turns ranks into the [B, K, K] preference pairs (ties dropped).
- prompts: `tokens` int32 [B, T] left padded, ending with `<|assistant|>`;
  `segment_ids` [B, T] (1 on prompt tokens, 0 on pads); `positions` [B, T] (0 at the
  first prompt token, 0 on pads).
Rows that only pad the last batch of a finite run are all zeros (masks 0).

Length: pretraining never drops tokens (packing splits long documents; text over
records.MAX_DOC_CHARS characters already arrives as several documents). Chat examples
are never cut (train/data/fit.py): `sft_dataset`, `ranked_dataset` and `prompts_dataset`
measure every record once (`fitting_records`) and leave out those longer than T
(counted, one warning line) or stop naming the record, by the source's `bad_records`
policy. An SFT conversation fits when its first T + 1 tokens are all of it; a ranked
record when each of its first K responses fits with the prompt; a prompt when it fits
with its `<|assistant|>` marker. Responses beyond K are dropped (first K kept).

Sharding: each process reads only records index::count of the source (from
`process_shard`, which follows the mesh), then shuffles its share per epoch by `seed`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import grain
import jax
import numpy as np
from absl import flags
from jax.sharding import Mesh

from model import sharding as sh
from model.tokenizer import AnyTokenizer
from train.data import fit
from train.data.packing import PackIterDataset, assemble_row, concat_documents, shift_document

PACKING = ("first_fit", "concat_split", "none")


@dataclasses.dataclass(frozen=True)
class DataOptions:
    """Order, sharding and parallelism shared by every pipeline.

    num_epochs=None repeats forever (training stops by step count). shard_index and
    shard_count come from `process_shard(mesh, rules)` on multi-host runs.
    drop_remainder drops the last len % shard_count records so shards are equal.
    With finite epochs, shards can yield different numbers of batches: multi-host
    loops should run a fixed number of steps.
    read_chunk: records read and tokenized together as one grain element (packed
    pipelines only); it fixes the meaning of the saved state, so it is stamped.
    num_threads/prefetch: reader threads and their buffer (elements: chunks when packed).
    The buffer fills while the model compiles, so it bounds host memory: at most
    prefetch x read_chunk records (each at most records.MAX_DOC_CHARS of text) are
    tokenized ahead; 16 x 64 records keep two threads busy for batches of any size.
    num_workers > 0: read and tokenize in that many spawned processes (scripts need an
    `if __name__ == "__main__":` guard); the batches are the same as with 0 workers.
    """

    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None
    shard_index: int = 0
    shard_count: int = 1
    drop_remainder: bool = False
    read_chunk: int = 64
    num_threads: int = 2
    prefetch: int = 16
    num_workers: int = 0


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def conversation(record: Mapping[str, Any]) -> list[dict[str, str]]:
    """Stored `roles`/`contents` -> [{"role", "content"}]."""
    roles, contents = record["roles"], record["contents"]
    return [{"role": _text(r), "content": _text(c)} for r, c in zip(roles, contents, strict=True)]


def _ranked_rows(
    record: Mapping[str, Any], tokenizer: AnyTokenizer, max_responses: int
) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    """(ids, mask, rank) of each of the first `max_responses` responses (0 = all) after
    the prompt, through the chat template."""
    prompt = conversation(record)
    for k, (response, rank) in enumerate(zip(record["responses"], record["ranks"], strict=True)):
        if k == max_responses > 0:
            return
        turn = {"role": "assistant", "content": _text(response)}
        yield (*tokenizer.encode_chat([*prompt, turn]), rank)


def record_length(
    record: Mapping[str, Any], tokenizer: AnyTokenizer, kind: str, max_responses: int = 0
) -> int:
    """The row positions a chat record takes, whole (train/data/fit.py): an SFT
    conversation's tokens minus one (inputs and targets are shifted), a prompt's tokens
    with the `<|assistant|>` marker, the longest of a ranked record's first
    `max_responses` (0 = all) prompt + response rows."""
    if kind == "sft":
        return tokenizer.encode_chat(conversation(record))[0].size - 1
    if kind == "prompts":
        return tokenizer.encode_chat(conversation(record), add_generation_prompt=True)[0].size
    if kind == "ranked":
        return max(ids.size for ids, _, _ in _ranked_rows(record, tokenizer, max_responses))
    raise ValueError(f"record kind {kind!r}: choose from ('sft', 'ranked', 'prompts')")


def _read_all(source: Sequence[Any], chunk: int = 1024) -> Iterator[Any]:
    """Every record of `source` in order, read in batches where the source can."""
    for start in range(0, len(source), chunk):
        indices = list(range(start, min(start + chunk, len(source))))
        if hasattr(source, "__getitems__"):
            yield from source.__getitems__(indices)
        else:
            yield from (source[i] for i in indices)


def fitting_records(
    source: Sequence[Any],
    tokenizer: AnyTokenizer,
    kind: str,
    seq_len: int,
    max_responses: int = 0,
) -> Sequence[Any]:
    """`source` without its records longer than seq_len (`record_length`), under its
    bad-record policy (`source.bad_records`, "skip" for a plain list): skipped ones are
    counted in one warning line on stderr; "fail" raises naming the first one
    (`file:line` where `source.locate` knows it). No record fitting raises. Every record
    is tokenized once, here, when the pipeline is built."""
    lengths = [record_length(r, tokenizer, kind, max_responses) for r in _read_all(source)]
    verdict = fit.check_lengths(
        lengths,
        seq_len,
        getattr(source, "bad_records", "skip"),
        getattr(source, "label", "data"),
        getattr(source, "locate", None),
    )
    if verdict.warning and jax.process_index() == 0:
        print(verdict.warning, file=sys.stderr)
    return fit.KeptRecords(source, verdict.kept) if verdict.skipped else source


def generation_prompt(
    tokenizer: AnyTokenizer, messages: Sequence[Mapping[str, str]], limit: int, what: str
) -> np.ndarray:
    """[L] ids of a chat prompt ending with `<|assistant|>`, L <= limit: whole oldest
    exchanges dropped when it is longer (fit.drop_oldest_turns, ValueError naming `what`
    when the last user turn alone does not fit)."""

    def length(turns: Sequence[Mapping[str, str]]) -> int:
        return tokenizer.encode_chat(turns, add_generation_prompt=True)[0].size

    kept = fit.drop_oldest_turns(messages, length, limit, what)
    return tokenizer.encode_chat(kept, add_generation_prompt=True)[0]


def tokenize_text(record: Mapping[str, Any], tokenizer: AnyTokenizer, text_key: str) -> dict:
    """One document -> shifted pairs of bos + tokens + eos (every target counts)."""
    return shift_document(tokenizer.encode_document(_text(record[text_key])))


def tokenize_chunk(records: Sequence[Mapping[str, Any]], doc_fn: Any) -> dict:
    """A list of records -> one chunk of their documents (see packing.concat_documents)."""
    return concat_documents([doc_fn(r) for r in records])


def tokenize_sft(record: Mapping[str, Any], tokenizer: AnyTokenizer, seq_len: int) -> dict:
    """One conversation -> shifted pairs, loss on assistant tokens. A conversation longer
    than T + 1 tokens raises fit.RecordTooLongError (the datasets leave those out first)."""
    ids, mask = tokenizer.encode_chat(conversation(record))
    fit.require_fit(ids.size - 1, seq_len)
    return shift_document(ids, mask)


def tokenize_ranked(
    record: Mapping[str, Any], tokenizer: AnyTokenizer, seq_len: int, max_responses: int
) -> dict[str, np.ndarray]:
    """One prompt with K responses -> the [K_max, T] arrays of the ranked batch format.
    A prompt + response row longer than T raises fit.RecordTooLongError."""
    K, T = max_responses, seq_len
    out = {
        "tokens": np.zeros((K, T), np.int32),
        "segment_ids": np.zeros((K, T), np.int32),
        "positions": np.zeros((K, T), np.int32),
        "completion_mask": np.zeros((K, T), np.float32),
        "response_mask": np.zeros(K, np.float32),
        "ranks": np.full(K, -1, np.int32),
    }
    for k, (ids, mask, rank) in enumerate(_ranked_rows(record, tokenizer, K)):
        fit.require_fit(ids.size, T)
        n = ids.size
        out["tokens"][k, :n] = ids
        out["segment_ids"][k, :n] = 1
        out["positions"][k, :n] = np.arange(n)
        out["completion_mask"][k, :n] = mask
        out["response_mask"][k] = 1.0
        out["ranks"][k] = rank
    return out


def tokenize_prompt(
    record: Mapping[str, Any], tokenizer: AnyTokenizer, seq_len: int
) -> dict[str, np.ndarray]:
    """One prompt -> left-padded [T] tokens ending with the assistant marker; a longer
    prompt raises fit.RecordTooLongError."""
    ids, _ = tokenizer.encode_chat(conversation(record), add_generation_prompt=True)
    fit.require_fit(ids.size, seq_len)
    n, pad = ids.size, seq_len - ids.size
    out = {k: np.zeros(seq_len, np.int32) for k in ("tokens", "segment_ids", "positions")}
    out["tokens"][pad:] = ids
    out["segment_ids"][pad:] = 1
    out["positions"][pad:] = np.arange(n)
    return out


def single_row(doc: dict, seq_len: int) -> dict[str, np.ndarray]:
    """One unpacked document per [T] row (segment_ids 1, zero padding)."""
    return assemble_row([doc], seq_len)


def pair_mask(ranks: Any, response_mask: Any) -> Any:
    """[B, K] ranks and validity -> [B, K, K] float, 1 where response i beats response j.

    Ties and padded responses give no pair. Works on numpy and jax arrays alike.
    """
    better = ranks[..., :, None] < ranks[..., None, :]
    valid = response_mask[..., :, None] * response_mask[..., None, :]
    return better * valid


def stack_rows(rows: Sequence[Mapping[str, np.ndarray]], batch_size: int) -> dict:
    """Stack rows into a batch; a short final batch is filled with all-zero rows."""
    batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    missing = batch_size - len(rows)
    if missing:
        batch = {
            k: np.concatenate([v, np.zeros((missing, *v.shape[1:]), v.dtype)])
            for k, v in batch.items()
        }
    return batch


class _StampedIterDataset(grain.IterDataset):
    """Adds the pipeline settings to the iterator state and checks them on restore."""

    def __init__(self, parent: grain.IterDataset, stamp: dict[str, Any]):
        super().__init__(parent)
        self._stamp = json.loads(json.dumps(stamp))

    def __iter__(self) -> grain.DatasetIterator:
        return _StampedIterator(self._parent.__iter__(), self._stamp)


class _StampedIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, stamp: dict[str, Any]):
        super().__init__(parent)
        self._stamp = stamp

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._parent)

    def get_state(self) -> dict[str, Any]:
        return {"pipeline": dict(self._stamp), "iterator": self._parent.get_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        saved, now = state.get("pipeline", {}), self._stamp
        diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        if diff:
            detail = ", ".join(f"{k}: saved {saved.get(k)!r}, now {now.get(k)!r}" for k in diff)
            raise ValueError(f"data iterator state does not match this pipeline ({detail})")
        self._parent.set_state(state["iterator"])


def _records(source: Sequence[Any], options: DataOptions) -> grain.MapDataset:
    """This process's share of the records, shuffled per epoch, repeated."""
    ds = grain.MapDataset.source(source)
    index, count = options.shard_index, options.shard_count
    if not 0 <= index < count:
        raise ValueError(f"shard_index={index} must be in [0, shard_count={count})")
    total = len(ds)
    if options.drop_remainder:
        ds = ds[: total - total % count]
    ds = ds[index::count]
    if len(ds) == 0:
        raise ValueError(f"shard {index} of {count} is empty: the source has {total} records")
    if options.shuffle:
        ds = ds.shuffle(seed=options.seed)
    return ds.repeat(options.num_epochs)


def _chunks(ds: grain.MapDataset, doc_fn: Any, options: DataOptions) -> grain.MapDataset:
    """Records -> chunks of `read_chunk` tokenized documents (batched reads)."""
    ds = ds.batch(options.read_chunk, batch_fn=list)
    return ds.map(functools.partial(tokenize_chunk, doc_fn=doc_fn))


def _batches(
    ds: grain.MapDataset,
    options: DataOptions,
    batch_size: int,
    stamp: dict[str, Any],
    seq_len: int | None = None,
    packing: str = "none",
    num_bins: int = 64,
) -> grain.IterDataset:
    it = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=options.num_threads, prefetch_buffer_size=options.prefetch)
    )
    if options.num_workers:
        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; keep defaults
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=options.num_workers))
    if packing != "none":
        it = PackIterDataset(it, seq_len, packing, num_bins)
    it = it.batch(batch_size, batch_fn=functools.partial(stack_rows, batch_size=batch_size))
    options_stamp = dataclasses.asdict(options)
    for key in ("num_threads", "prefetch", "num_workers"):  # do not change the data
        options_stamp.pop(key)
    return _StampedIterDataset(it, {**stamp, **options_stamp, "batch_size": batch_size})


def _check_packing(packing: str, allowed: Sequence[str] = PACKING) -> None:
    if packing not in allowed:
        raise ValueError(f"packing={packing!r}: choose from {tuple(allowed)}")


def pretrain_dataset(
    source: Sequence[Any],
    tokenizer: AnyTokenizer,
    batch_size: int,
    seq_len: int,
    options: DataOptions = DataOptions(),
    packing: str = "first_fit",
    num_bins: int = 64,
    text_key: str = "text",
) -> grain.IterDataset:
    """Packed next-token batches [B, T] from text records (see the module docstring)."""
    _check_packing(packing, PACKING[:2])
    doc_fn = functools.partial(tokenize_text, tokenizer=tokenizer, text_key=text_key)
    ds = _chunks(_records(source, options), doc_fn, options)
    stamp = {"stage": "pretrain", "seq_len": seq_len, "packing": packing, "num_bins": num_bins}
    stamp |= {"tokenizer": tokenizer.fingerprint, "records": len(source), "text_key": text_key}
    return _batches(ds, options, batch_size, stamp, seq_len, packing, num_bins)


def sft_dataset(
    source: Sequence[Any],
    tokenizer: AnyTokenizer,
    batch_size: int,
    seq_len: int,
    options: DataOptions = DataOptions(),
    packing: str = "first_fit",
    num_bins: int = 64,
) -> grain.IterDataset:
    """SFT batches [B, T]: chat template, loss on assistant tokens; packed or one per row."""
    _check_packing(packing)
    source = fitting_records(source, tokenizer, "sft", seq_len)
    doc_fn = functools.partial(tokenize_sft, tokenizer=tokenizer, seq_len=seq_len)
    if packing == "none":
        ds = _records(source, options).map(doc_fn)
        ds = ds.map(functools.partial(single_row, seq_len=seq_len))
    else:
        ds = _chunks(_records(source, options), doc_fn, options)
    stamp = {"stage": "sft", "seq_len": seq_len, "packing": packing, "num_bins": num_bins}
    stamp |= {"tokenizer": tokenizer.fingerprint, "records": len(source)}
    return _batches(ds, options, batch_size, stamp, seq_len, packing, num_bins)


def ranked_dataset(
    source: Sequence[Any],
    tokenizer: AnyTokenizer,
    batch_size: int,
    seq_len: int,
    max_responses: int = 4,
    options: DataOptions = DataOptions(),
) -> grain.IterDataset:
    """Ranked-response batches [B, K_max, T] (reward model, DPO with K = 2)."""
    source = fitting_records(source, tokenizer, "ranked", seq_len, max_responses)
    tokenize = functools.partial(
        tokenize_ranked, tokenizer=tokenizer, seq_len=seq_len, max_responses=max_responses
    )
    ds = _records(source, options).map(tokenize)
    stamp = {"stage": "ranked", "seq_len": seq_len, "max_responses": max_responses}
    stamp |= {"tokenizer": tokenizer.fingerprint, "records": len(source)}
    return _batches(ds, options, batch_size, stamp)


def prompts_dataset(
    source: Sequence[Any],
    tokenizer: AnyTokenizer,
    batch_size: int,
    seq_len: int,
    options: DataOptions = DataOptions(),
) -> grain.IterDataset:
    """Left-padded prompt batches [B, T] for RL rollouts."""
    source = fitting_records(source, tokenizer, "prompts", seq_len)
    tokenize = functools.partial(tokenize_prompt, tokenizer=tokenizer, seq_len=seq_len)
    ds = _records(source, options).map(tokenize)
    stamp = {"stage": "prompts", "seq_len": seq_len}
    stamp |= {"tokenizer": tokenizer.fingerprint, "records": len(source)}
    return _batches(ds, options, batch_size, stamp)


def process_shard(mesh: Mesh, rules: sh.Rules) -> tuple[int, int]:
    """(shard_index, shard_count) of this process's slice of the global batch.

    Follows the batch sharding: processes holding the same batch rows (e.g. tensor
    parallelism across hosts) get the same shard and so read the same data.
    """
    n = mesh.devices.size
    index_map = sh.batch_sharding(mesh, rules, ndim=1).devices_indices_map((n,))
    rows = set()
    for device, (rows_slice,) in index_map.items():
        if device.process_index == jax.process_index():
            rows.update(range(*rows_slice.indices(n)))
    lo, hi = min(rows), max(rows) + 1
    size = hi - lo
    if len(rows) != size or n % size or lo % size:
        raise ValueError(f"process {jax.process_index()} holds batch rows {sorted(rows)} of {n}")
    return lo // size, n // size


def local_batch_size(global_batch_size: int, shard_count: int) -> int:
    if global_batch_size % shard_count:
        raise ValueError(
            f"batch_size={global_batch_size} is not divisible by the {shard_count} data shards"
        )
    return global_batch_size // shard_count


def make_global_batch(
    batch: Mapping[str, np.ndarray], mesh: Mesh, rules: sh.Rules
) -> dict[str, jax.Array]:
    """Host-local [B_local, ...] arrays -> global jax.Arrays split over the batch axes.

    Global batch = B_local x shard_count (`process_shard`); each process passes the rows
    of its shard, processes on the same shard pass the same rows.
    """
    _, count = process_shard(mesh, rules)
    out = {}
    for key, value in batch.items():
        value = np.asarray(value)
        sharding = sh.batch_sharding(mesh, rules, value.ndim)
        global_shape = (value.shape[0] * count, *value.shape[1:])
        out[key] = jax.make_array_from_process_local_data(sharding, value, global_shape)
    return out


def tokens_in(batch: Mapping[str, np.ndarray]) -> int:
    """Trained tokens in an LM batch (the loss mask sum)."""
    return int(np.sum(batch["loss_mask"]))
