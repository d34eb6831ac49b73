"""grain pipelines: determinism, per-process shards, exact resume, every batch format."""

import itertools
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from model import sharding as sh
from model import tokenizer as tk
from train.data import builders, fit
from train.data import pipelines as pl

SHAKESPEARE = Path(__file__).resolve().parent.parent / ".." / "shared/data/tinyshakespeare.txt"
OPTS = pl.DataOptions(num_threads=1, prefetch=8)


@pytest.fixture(scope="module")
def tok():
    if not SHAKESPEARE.exists():
        pytest.skip(f"{SHAKESPEARE} is missing")
    with open(SHAKESPEARE, encoding="utf-8") as f:
        lines = tk.training_sentences(itertools.islice(f, 4000))
        return tk.train_tokenizer(lines, 512, "bpe", num_threads=1)


@pytest.fixture(scope="module")
def shakespeare(tmp_path_factory):
    """The validation split of the preset: 441 speeches, prepared to array_record."""
    return builders.open_source(
        "text", name="tiny_shakespeare", split="validation",
        data_dir=str(tmp_path_factory.mktemp("tfds")), local_copy=str(SHAKESPEARE),
    )  # fmt: skip


def numbered_docs(n):
    return [{"text": f"doc {i}: " + "the king " * (i % 5)} for i in range(n)]


def sft_records(n):
    return [
        {"roles": ["user", "assistant"], "contents": [f"question {i}?", f"answer {i} 😀"]}
        for i in range(n)
    ]


def ranked_records(n):
    return [
        {
            "roles": ["user"],
            "contents": [f"prompt {i}"],
            "responses": [f"best {i}", f"worse {i}", f"tied {i}"][: 2 + i % 2],
            "ranks": [0, 1, 1][: 2 + i % 2],
        }
        for i in range(n)
    ]


def prompt_records(n):
    return [{"roles": ["user"], "contents": [f"tell me {i} " * (1 + i % 3)]} for i in range(n)]


def take(ds_or_it, n):
    return list(itertools.islice(iter(ds_or_it), n))


def assert_same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def doc_ids(batches, tok):
    """Ids of the numbered documents in the segments of pretraining batches."""
    found = []
    for batch in batches:
        for row_inputs, row_segments in zip(batch["inputs"], batch["segment_ids"], strict=True):
            for seg in np.unique(row_segments[row_segments > 0]):
                text = tok.decode(row_inputs[row_segments == seg])
                found.append(int(text.split(":")[0].removeprefix("doc ")))
    return found


def test_same_seed_same_batches_other_seed_differs(tok, shakespeare):
    def make(seed):
        options = pl.DataOptions(seed=seed, num_threads=1, prefetch=8)
        return take(pl.pretrain_dataset(shakespeare, tok, 4, 64, options), 5)

    assert_same(make(0), make(0))
    assert not np.array_equal(make(0)[0]["inputs"], make(1)[0]["inputs"])


@pytest.mark.parametrize("drop_remainder", [False, True])
def test_process_shards_are_disjoint_and_cover(tok, drop_remainder):
    docs, count = numbered_docs(50), 3
    shards = []
    for index in range(count):
        options = pl.DataOptions(
            num_epochs=1, shard_index=index, shard_count=count, drop_remainder=drop_remainder,
            num_threads=1, prefetch=8,
        )  # fmt: skip
        ids = doc_ids(pl.pretrain_dataset(docs, tok, 4, 64, options), tok)
        assert len(ids) == len(set(ids)), "each document once per epoch"
        shards.append(set(ids))
    for a, b in itertools.combinations(shards, 2):
        assert not a & b
    covered = set().union(*shards)
    assert covered == (set(range(48)) if drop_remainder else set(range(50)))
    # Shuffled: the order within a shard is not the source order.
    assert doc_ids(take(pl.pretrain_dataset(docs, tok, 4, 64, OPTS), 2), tok)[:5] != [0, 1, 2, 3, 4]


def resume_check(make_ds, skip=7, n=50):
    """Run `skip` batches, save the state (through JSON), compare the next n batches."""
    it = iter(make_ds())
    take(it, skip)
    state = json.loads(json.dumps(it.get_state()))
    expected = take(it, n)
    resumed = iter(make_ds())
    resumed.set_state(state)
    assert_same(take(resumed, n), expected)


@pytest.mark.parametrize("packing", ["first_fit", "concat_split"])
def test_pretrain_resume_identical_50_batches_on_each_host(tok, shakespeare, packing):
    for index in range(2):  # two hosts; 57 batches cross the epoch boundary of a shard
        options = pl.DataOptions(shard_index=index, shard_count=2, num_threads=1, prefetch=8)
        resume_check(lambda o=options: pl.pretrain_dataset(shakespeare, tok, 4, 128, o, packing))


@pytest.mark.parametrize(
    "make",
    [
        lambda tok: pl.sft_dataset(sft_records(30), tok, 4, 48, OPTS),
        lambda tok: pl.sft_dataset(sft_records(30), tok, 4, 48, OPTS, packing="none"),
        lambda tok: pl.ranked_dataset(ranked_records(30), tok, 4, 32, 3, OPTS),
        lambda tok: pl.prompts_dataset(prompt_records(30), tok, 4, 32, OPTS),
    ],
    ids=["sft_packed", "sft_unpacked", "ranked", "prompts"],
)
def test_other_stages_resume_identical_50_batches(tok, make):
    resume_check(lambda: make(tok))


def test_restoring_into_another_pipeline_raises(tok):
    it = iter(pl.sft_dataset(sft_records(10), tok, 2, 48, OPTS))
    next(it)
    other = iter(pl.sft_dataset(sft_records(10), tok, 2, 64, OPTS))
    with pytest.raises(ValueError, match="seq_len: saved 48, now 64"):
        other.set_state(it.get_state())


@pytest.mark.parametrize("packing", ["first_fit", "none"])
def test_sft_loss_only_on_assistant_tokens(tok, packing):
    batch = take(pl.sft_dataset(sft_records(12), tok, 6, 64, OPTS, packing=packing), 1)[0]
    seen = 0
    for row in range(6):
        segments = batch["segment_ids"][row]
        for seg in np.unique(segments[segments > 0]):
            where = segments == seg
            inputs, targets = batch["inputs"][row][where], batch["targets"][row][where]
            question = tok.decode(inputs).split("?")[0]
            i = int(question.removeprefix("<|user|>question "))
            trained = targets[batch["loss_mask"][row][where] == 1]
            assert trained.tolist() == [*tok.encode(f"answer {i} 😀"), tk.END_ID]
            assert inputs[0] == tk.BOS_ID
            seen += 1
    assert seen >= 6
    assert batch["loss_mask"].dtype == np.float32 and batch["inputs"].dtype == np.int32


def test_ranked_batch_format_and_pairs(tok):
    options = pl.DataOptions(shuffle=False)
    batch = take(pl.ranked_dataset(ranked_records(4), tok, 4, 32, 4, options), 1)[0]
    assert batch["tokens"].shape == (4, 4, 32) and batch["response_mask"].shape == (4, 4)
    np.testing.assert_array_equal(batch["response_mask"][:2], [[1, 1, 0, 0], [1, 1, 1, 0]])
    np.testing.assert_array_equal(batch["ranks"][1], [0, 1, 1, -1])
    for k, text in enumerate(["best 1", "worse 1", "tied 1"]):
        completion = batch["tokens"][1, k][batch["completion_mask"][1, k] == 1]
        assert completion.tolist() == [*tok.encode(text), tk.END_ID]
        n = int(batch["segment_ids"][1, k].sum())
        assert batch["tokens"][1, k, n - 1] == tk.END_ID  # the reward is read here
        np.testing.assert_array_equal(batch["positions"][1, k, :n], np.arange(n))
    pairs = pl.pair_mask(batch["ranks"], batch["response_mask"])
    assert pairs.shape == (4, 4, 4)
    np.testing.assert_array_equal(pairs[1, 0], [0, 1, 1, 0])  # best beats both others
    assert pairs[1, 1, 2] == 0 and pairs[1, 2, 1] == 0  # the tie gives no pair
    assert pairs[0].sum() == 1


def test_long_prompts_are_refused_not_cut(tok):
    """train/data/fit.py: no token of a record is dropped (tests/test_fit_policy.py)."""
    record = {
        "roles": ["user"],
        "contents": ["word " * 60],
        "responses": ["short answer", "other"],
        "ranks": [0, 1],
    }
    with pytest.raises(fit.RecordTooLongError, match="longer than seq_len=24"):
        pl.tokenize_ranked(record, tok, seq_len=24, max_responses=2)
    with pytest.raises(fit.RecordTooLongError, match="longer than seq_len=16"):
        pl.tokenize_prompt({"roles": ["user"], "contents": ["word " * 60]}, tok, 16)


def test_prompt_batches_are_left_padded(tok):
    batch = take(pl.prompts_dataset(prompt_records(8), tok, 8, 32, OPTS), 1)[0]
    assert set(batch) == {"tokens", "segment_ids", "positions"}
    for tokens, segments, positions in zip(
        batch["tokens"], batch["segment_ids"], batch["positions"], strict=True
    ):
        n = int(segments.sum())
        assert np.all(segments[-n:] == 1) and not np.any(tokens[:-n])
        assert tokens[-n] == tk.BOS_ID and tokens[-1] == tk.ASSISTANT_ID
        np.testing.assert_array_equal(positions[-n:], np.arange(n))
        assert "tell me" in tok.decode(tokens)


def test_final_batch_of_a_finite_run_is_padded(tok):
    options = pl.DataOptions(num_epochs=1, num_threads=1, prefetch=8)
    batches = list(pl.sft_dataset(sft_records(5), tok, 4, 48, options, packing="none"))
    assert len(batches) == 2 and batches[1]["inputs"].shape == (4, 48)
    assert not batches[1]["loss_mask"][1:].any()


@pytest.mark.parametrize("mesh_shape", [(-1, 1, 1), (2, 2, 2)])
def test_global_batch_on_the_mesh(tok, mesh_shape):
    mesh = sh.make_mesh(*mesh_shape)
    rules = sh.get_rules("fsdp_tp")
    assert pl.process_shard(mesh, rules) == (0, 1)  # one process holds every row
    local = take(pl.pretrain_dataset(numbered_docs(20), tok, 8, 32, OPTS), 1)[0]
    ranked = take(pl.ranked_dataset(ranked_records(8), tok, 8, 32, 2, OPTS), 1)[0]
    for batch in (local, ranked):
        global_batch = pl.make_global_batch(batch, mesh, rules)
        for key, value in global_batch.items():
            assert isinstance(value, jax.Array) and value.shape == batch[key].shape
            assert value.sharding.spec[0] == ("data", "fsdp")
            np.testing.assert_array_equal(np.asarray(value), batch[key])
    assert pl.local_batch_size(16, 2) == 8
    with pytest.raises(ValueError, match="not divisible"):
        pl.local_batch_size(10, 4)


@pytest.mark.slow
def test_worker_processes_give_the_same_batches_and_resume(tok, shakespeare):
    def make(workers):
        options = pl.DataOptions(num_workers=workers, read_chunk=16, num_threads=1, prefetch=8)
        return pl.pretrain_dataset(shakespeare, tok, 4, 128, options)

    reference = take(make(0), 30)
    it = iter(make(2))
    assert_same(take(it, 10), reference[:10])
    state = json.loads(json.dumps(it.get_state()))
    assert_same(take(it, 20), reference[10:])
    it.close()
    resumed = iter(make(2))
    resumed.set_state(state)
    assert_same(take(resumed, 20), reference[10:])
    resumed.close()


TWO_HOSTS = """
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax
import numpy as np
jax.config.update("jax_cpu_collectives_implementation", "gloo")
pid = int(sys.argv[1])
jax.distributed.initialize(f"localhost:{sys.argv[2]}", num_processes=2, process_id=pid)
from model import sharding as sh
from train.data import pipelines as pl
mesh, rules = sh.make_mesh(-1, 1, 1), sh.get_rules("fsdp")
assert pl.process_shard(mesh, rules) == (pid, 2), pl.process_shard(mesh, rules)
batch = pl.make_global_batch({"inputs": np.full((4, 8), pid, np.int32)}, mesh, rules)
assert batch["inputs"].shape == (8, 8)
assert all((np.asarray(s.data) == pid).all() for s in batch["inputs"].addressable_shards)
print("ok")
"""


def test_two_processes_read_their_own_shard_into_one_global_batch():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = str(s.getsockname()[1])
    root = Path(__file__).resolve().parent.parent
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", TWO_HOSTS, str(pid), port],
            cwd=root,
            env={**os.environ, "PYTHONPATH": str(root)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for pid in range(2)
    ]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert all("ok" in out for out in outputs), outputs
