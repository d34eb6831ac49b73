"""Chat examples longer than the context are kept whole or left out, never cut
(train/data/fit.py): skipped and counted, or the run stops naming file:line; generation
prompts lose whole oldest exchanges only.

The tokenizer is a character one (every lowercase letter is one token, no word-boundary
piece), so every length below is counted by hand: bos, then per turn a role marker, the
content's letters and `<|end|>`; a prompt adds the final `<|assistant|>`.
"""

from __future__ import annotations

import itertools
import json
import pathlib
import types

import numpy as np
import pytest

from model import tokenizer as tk
from train import sft
from train.data import builders, fit
from train.data import pipelines as pl

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
OPTS = pl.DataOptions(num_threads=1, prefetch=8, shuffle=False, num_epochs=1)
B, U, A, S, E = tk.BOS_ID, tk.USER_ID, tk.ASSISTANT_ID, tk.SYSTEM_ID, tk.END_ID


@pytest.fixture(scope="module")
def tok() -> tk.Tokenizer:
    if not SHAKESPEARE.exists():
        pytest.skip(f"{SHAKESPEARE} is missing")
    with open(SHAKESPEARE, encoding="utf-8") as f:
        text = itertools.islice(f, 0, 2000)
        return tk.train_tokenizer(tk.training_sentences(text), 4096, "char")


def letters(tok: tk.Tokenizer, text: str) -> list[int]:
    ids = tok.encode(text)
    assert len(ids) == len(text)  # one token per letter: the hand counts hold
    return ids


def write_jsonl(path: pathlib.Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def prepared(tmp_path: pathlib.Path, kind: str, rows: list[dict], policy: str):
    path = write_jsonl(tmp_path / f"{kind}.jsonl", rows)
    data_dir = str(tmp_path / f"tfds_{policy}")
    return path, builders.prepare(kind, path, data_dir, bad_records=policy).source()


def conv(prompt: str, response: str) -> dict:
    return {"roles": ["user", "assistant"], "contents": [prompt, response]}


# SFT: {"prompt": "ab", "response": "a"} is bos + (<|user|> a b <|end|>) + (<|assistant|>
# a <|end|>) = 8 tokens, a row of 7 (inputs and targets are shifted). "abcdef" -> "abc"
# is 1 + 8 + 5 = 14 tokens, a row of 13.
SFT_ROWS = [
    {"prompt": "ab", "response": "a"},
    {"prompt": "ba", "response": "b"},
    {"prompt": "abcdef", "response": "abc"},  # line 3: 13 > seq_len=8
    {"prompt": "aa", "response": "b"},
]


def test_a_record_that_fits_is_unchanged(tok):
    a, b = letters(tok, "ab")
    record = conv("ab", "a")
    full = [B, U, a, b, E, A, a, E]
    assert pl.record_length(record, tok, "sft") == 7
    out = pl.tokenize_sft(record, tok, 7)  # exactly the row: nothing cut
    assert out["inputs"].tolist() == full[:-1] and out["targets"].tolist() == full[1:]
    assert out["loss_mask"].tolist() == [0, 0, 0, 0, 0, 1, 1]  # targets a and <|end|>
    source = [record, conv("ba", "b")]
    assert pl.fitting_records(source, tok, "sft", 7) is source
    prompt = {"roles": ["user"], "contents": ["ab"]}
    assert pl.record_length(prompt, tok, "prompts") == 6
    assert pl.tokenize_prompt(prompt, tok, 6)["tokens"].tolist() == [B, U, a, b, E, A]
    ranked = {**prompt, "responses": ["a", "bb"], "ranks": [0, 1]}
    assert pl.record_length(ranked, tok, "ranked") == 9  # the longer row: 4 + 1 + 4
    out = pl.tokenize_ranked(ranked, tok, 9, 2)
    assert out["tokens"].tolist() == [[B, U, a, b, E, A, a, E, 0], [B, U, a, b, E, A, b, b, E]]
    ends = out["segment_ids"].sum(-1) - 1  # where the reward is read
    assert out["tokens"][[0, 1], ends].tolist() == [E, E]


def test_tokenize_functions_refuse_a_record_they_would_have_to_cut(tok):
    with pytest.raises(fit.RecordTooLongError, match="too long: 7 tokens, longer than seq_len=6"):
        pl.tokenize_sft(conv("ab", "a"), tok, 6)
    ranked = {"roles": ["user"], "contents": ["ab"], "responses": ["a", "bb"], "ranks": [0, 1]}
    with pytest.raises(fit.RecordTooLongError, match="9 tokens, longer than seq_len=8"):
        pl.tokenize_ranked(ranked, tok, 8, 2)
    with pytest.raises(fit.RecordTooLongError, match="6 tokens, longer than seq_len=5"):
        pl.tokenize_prompt({"roles": ["user"], "contents": ["ab"]}, tok, 5)


def test_overlong_sft_record_is_skipped_and_counted(tok, tmp_path, capsys):
    path, source = prepared(tmp_path, "sft", SFT_ROWS, "skip")
    capsys.readouterr()  # the preparation's progress bars
    assert source.bad_records == "skip" and len(source) == 4
    kept = pl.fitting_records(source, tok, "sft", 8)
    assert len(kept) == 3
    err = capsys.readouterr().err.strip()
    assert err == (
        f"{path}: skipped 1 of 4 records longer than seq_len=8 (longest 13 tokens, "
        f"{path}:3; bad_records=fail to stop instead)"
    )
    # Every row of the batches is one whole conversation: markers and <|end|> all kept.
    batches = list(pl.sft_dataset(source, tok, 4, 8, OPTS, packing="none"))
    assert len(batches) == 1
    rows = batches[0]
    whole = []
    for inputs, targets, segments in zip(
        rows["inputs"], rows["targets"], rows["segment_ids"], strict=True
    ):
        n = int(segments.sum())
        whole.append(tuple([*inputs[:n].tolist(), int(targets[n - 1])]))
    want = {
        tuple(tok.encode_chat(pl.conversation(conv(r["prompt"], r["response"])))[0])
        for r in SFT_ROWS
    }
    assert set(whole[:3]) <= want and len(set(whole[:3])) == 3
    assert whole[3] == (0,)  # the padding row of the last batch (n = 0)
    for row in whole[:3]:
        assert row[0] == B and row.count(U) == 1 and row.count(A) == 1 and row.count(E) == 2


def test_overlong_sft_record_fails_naming_file_and_line(tok, tmp_path):
    path, source = prepared(tmp_path, "sft", SFT_ROWS, "fail")
    with pytest.raises(fit.RecordTooLongError) as caught:
        pl.sft_dataset(source, tok, 2, 8, OPTS)
    assert str(caught.value) == (
        f"{path}:3: too long: 13 tokens, longer than seq_len=8 (bad_records=skip leaves them out)"
    )


# Ranked: prompt "ab" with "a" / "bb" gives rows of 8 and 9 tokens; "abcdefgh" a row of 15.
RANKED_ROWS = [
    {"prompt": "ab", "chosen": "a", "rejected": "bb"},
    {"prompt": "ab", "chosen": "a", "rejected": "abcdefgh"},  # line 2: 15 > 10
    {"prompt": "ba", "responses": ["b", "a", "abcdefgh"], "ranking": [0, 1, 2]},  # K=2: fits
]


def test_overlong_ranked_record_is_skipped_and_fails_by_policy(tok, tmp_path, capsys):
    path, source = prepared(tmp_path, "ranked", RANKED_ROWS, "skip")
    capsys.readouterr()  # the preparation's progress bars
    assert len(pl.fitting_records(source, tok, "ranked", 10, max_responses=2)) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"{path}: skipped 1 of 3 records longer than seq_len=10 (longest 15 tokens, "
        f"{path}:2; bad_records=fail to stop instead)"
    )
    batch = next(iter(pl.ranked_dataset(source, tok, 2, 10, 2, OPTS)))
    assert batch["response_mask"].tolist() == [[1, 1], [1, 1]]
    ends = batch["segment_ids"].sum(-1) - 1  # the reward token: each response's <|end|>
    assert (np.take_along_axis(batch["tokens"], ends[..., None], -1) == E).all()
    # With all three responses (DPO's max_responses=0), the third record is too long too.
    assert len(pl.fitting_records(source, tok, "ranked", 10)) == 1
    path, source = prepared(tmp_path, "ranked", RANKED_ROWS, "fail")
    with pytest.raises(fit.RecordTooLongError) as caught:
        pl.ranked_dataset(source, tok, 2, 10, 2, OPTS)
    assert str(caught.value) == (
        f"{path}:2: too long: 15 tokens, longer than seq_len=10 (bad_records=skip leaves them out)"
    )


# Prompts: "ab" is bos + 4 + <|assistant|> = 6 tokens; "abcdefghij" is 1 + 12 + 1 = 14.
PROMPT_ROWS = [{"prompt": "ab"}, {"prompt": "abcdefghij"}, {"prompt": "ba"}, {"prompt": "aa"}]


def test_overlong_ppo_prompt_is_skipped_and_fails_by_policy(tok, tmp_path, capsys):
    path, source = prepared(tmp_path, "prompts", PROMPT_ROWS, "skip")
    capsys.readouterr()  # the preparation's progress bars
    batch = next(iter(pl.prompts_dataset(source, tok, 4, 8, OPTS)))
    err = capsys.readouterr().err.strip()
    assert err == (
        f"{path}: skipped 1 of 4 records longer than seq_len=8 (longest 14 tokens, "
        f"{path}:2; bad_records=fail to stop instead)"
    )
    a, b = letters(tok, "ab")
    rows = sorted(batch["tokens"][:3].tolist())
    assert rows == sorted([[0, 0, B, U, *p, E, A] for p in ([a, b], [b, a], [a, a])])
    assert not batch["tokens"][3].any()  # padding row: 3 prompts kept
    path, source = prepared(tmp_path, "prompts", PROMPT_ROWS * 2, "fail")
    with pytest.raises(fit.RecordTooLongError) as caught:
        pl.prompts_dataset(source, tok, 4, 8, OPTS)
    assert str(caught.value) == (
        f"{path}:2: too long: 14 tokens, longer than seq_len=8 (1 more records are too "
        "long; bad_records=skip leaves them out)"
    )


def test_every_record_too_long_fails_with_one_line(tok, tmp_path):
    path, source = prepared(tmp_path, "sft", [SFT_ROWS[2]] * 2, "skip")
    with pytest.raises(ValueError) as caught:
        pl.sft_dataset(source, tok, 2, 8, OPTS)
    assert str(caught.value) == (
        f"{path}: all 2 records are longer than seq_len=8 (shortest 13 tokens); raise "
        "seq_len or shorten the records"
    )


def test_plain_lists_are_skipped_and_named_by_index(capsys):
    verdict = fit.check_lengths([3, 9, 4, 12], 8)
    assert verdict.kept == [0, 2] and verdict.skipped == 2
    assert verdict.warning == (
        "data: skipped 2 of 4 records longer than seq_len=8 (longest 12 tokens, data: record "
        "3; bad_records=fail to stop instead)"
    )
    with pytest.raises(fit.RecordTooLongError, match=r"^data: record 1: too long: 9 tokens"):
        fit.check_lengths([3, 9, 4, 12], 8, "fail")
    with pytest.raises(ValueError, match="bad_records='cut'"):
        fit.check_lengths([3], 8, "cut")


CHAT = [
    {"role": "system", "content": "s"},  # 3 tokens
    {"role": "user", "content": "aa"},  # 4
    {"role": "assistant", "content": "b"},  # 3
    {"role": "user", "content": "ab"},  # 4
    {"role": "assistant", "content": "a"},  # 3
    {"role": "user", "content": "ba"},  # 4; with bos and <|assistant|>: 23 in all
]


def test_chat_prompts_lose_whole_oldest_exchanges(tok):
    a, b = letters(tok, "ab")
    s = letters(tok, "s")[0]
    head, last = [B, S, s, E], [U, b, a, E, A]
    full = [*head, U, a, a, E, A, b, E, U, a, b, E, A, a, E, *last]
    assert pl.generation_prompt(tok, CHAT, 23, "limit").tolist() == full  # fits: unchanged
    second = [*head, U, a, b, E, A, a, E, *last]  # first exchange (7 tokens) dropped: 16
    assert pl.generation_prompt(tok, CHAT, 22, "limit").tolist() == second
    assert pl.generation_prompt(tok, CHAT, 16, "limit").tolist() == second
    assert pl.generation_prompt(tok, CHAT, 15, "limit").tolist() == [*head, *last]  # 9
    with pytest.raises(ValueError, match="is 9 tokens, more than limit=8"):
        pl.generation_prompt(tok, CHAT, 8, "limit")
    # No system turn: only the last user turn is sure to stay.
    assert pl.generation_prompt(tok, CHAT[1:], 6, "limit").tolist() == [B, *last]


def test_turn_dropping_keeps_turns_whole():
    def turns(*roles):
        return [{"role": r, "content": str(i)} for i, r in enumerate(roles)]

    def contents(messages):
        return [m["content"] for m in messages]

    # length_of = the number of turns, so each limit below is a count of turns.
    chat = turns("assistant", "user", "assistant", "assistant", "user", "assistant")
    assert fit.drop_oldest_turns(chat, len, 6) == chat
    assert contents(fit.drop_oldest_turns(chat, len, 5)) == ["1", "2", "3", "4", "5"]
    # The exchange user 1 -> assistant 2, 3 goes whole: never user 1 alone.
    assert contents(fit.drop_oldest_turns(chat, len, 4)) == ["4", "5"]
    assert contents(fit.drop_oldest_turns(chat, len, 2)) == ["4", "5"]
    with pytest.raises(ValueError, match="is 2 tokens, more than limit=1"):
        fit.drop_oldest_turns(chat, len, 1)
    system = turns("system", "system", "user", "assistant", "user")
    assert contents(fit.drop_oldest_turns(system, len, 4)) == ["0", "1", "4"]
    with pytest.raises(ValueError, match="is 3 tokens, more than limit=2"):
        fit.drop_oldest_turns(system, len, 2)


def test_sample_helper_names_the_limit_before_generating(tok):
    model = types.SimpleNamespace(config=types.SimpleNamespace(max_seq_len=16))
    prompt = [{"role": "user", "content": "abcdefgh"}]  # 1 + 10 + 1 = 12 > 16 - 8
    with pytest.raises(ValueError, match=r"max_seq_len - max_new_tokens \(16 - 8\)=8"):
        sft.sample_responses(model, None, tok, [prompt], None, 8, None, None, None)


def test_sft_stage_stops_before_writing_naming_the_record(tmp_path, capsys):
    from tests.test_sft import CONFIG, char_tokenizer, write_parent

    tokenizer = char_tokenizer(range(0, 2000))
    parent, _ = write_parent(tmp_path / "parent", tokenizer)
    rows = [{"prompt": "ab", "response": "a"}] * 8
    rows.insert(4, {"prompt": "ab", "response": "a" * 70})  # line 5: 1 + 4 + 72 - 1 = 76
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    workdir = tmp_path / "run"
    argv = [
        "--config", f"{CONFIG}:tiny", "--workdir", str(workdir),
        f"--config.init_from={parent}", f"--config.data.path={train}",
        f"--config.data.data_dir={tmp_path / 'tfds'}", "--config.eval.every_steps=0",
        "--config.seq_len=64", "--config.data.bad_records=fail",
    ]  # fmt: skip
    capsys.readouterr()
    assert sft.main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert err == [
        f"flaxlm sft: error: {train}:5: too long: 76 tokens, longer than seq_len=64 "
        "(bad_records=skip leaves them out)"
    ]
    assert not workdir.exists()


def test_policy_eval_prompts_skip_the_overlong_and_cycle_the_rest(tok, capsys):
    """The held-out prompts of PPO/GRPO/DPO evals: an over-long one is left out and
    counted, the others fill the batch in order; none fitting or none at all is a stop."""
    from model import sharding as sh
    from rlhf import policy_stage
    from train.stage import StageError

    config = types.SimpleNamespace(seq_len=8, batch_size=8, eval=types.SimpleNamespace())
    config.eval.batch_size = 0  # the training batch size, 8: one row per test device
    records = [{"roles": ["user"], "contents": [p["prompt"]]} for p in PROMPT_ROWS]
    mesh, rules = sh.make_mesh(-1, 1, 1), sh.get_rules("fsdp")
    batch = policy_stage.eval_prompt_batch(config, records, tok, mesh, rules)
    assert "data: skipped 1 of 4 records longer than seq_len=8" in capsys.readouterr().err
    a, b = letters(tok, "ab")
    rows = [[0, 0, B, U, *p, E, A] for p in [[a, b], [b, a], [a, a]] * 3][:8]
    assert np.asarray(batch["tokens"]).tolist() == rows  # kept prompts, cycled
    with pytest.raises(ValueError, match="all 1 records are longer than seq_len=8"):
        policy_stage.eval_prompt_batch(config, records[1:2], tok, mesh, rules)
    with pytest.raises(StageError, match="held-out prompt set is empty"):
        policy_stage.eval_prompt_batch(config, [], tok, mesh, rules)
