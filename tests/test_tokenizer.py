"""Tokenizer: fixed special ids, exact round trip, chat template, save/load, vocab check."""

import io
import itertools
import pickle
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from model import tokenizer as tk
from orchestrate import cli

SHAKESPEARE = Path(__file__).resolve().parent.parent / ".." / "shared/data/tinyshakespeare.txt"
VOCAB = {"bpe": 512, "unigram": 400, "char": 400}


def corpus_lines(n=4000):
    if not SHAKESPEARE.exists():
        pytest.skip(f"{SHAKESPEARE} is missing")
    with open(SHAKESPEARE, encoding="utf-8") as f:
        yield from itertools.islice(f, n)


@pytest.fixture(scope="module", params=sorted(VOCAB))
def tok(request):
    sentences = tk.training_sentences(corpus_lines())
    return tk.train_tokenizer(sentences, VOCAB[request.param], request.param, num_threads=1)


@pytest.fixture(scope="module")
def bpe():
    return tk.train_tokenizer(tk.training_sentences(corpus_lines()), 512, "bpe", num_threads=1)


ROUND_TRIP = [
    "To be, or not to be: that is the question.",
    "  leading and trailing spaces, double  spaces\tand tabs  ",
    "emoji 😀🎉 family 👨‍👩‍👧‍👦 flags 🇫🇷 skin tone 👍🏽",
    "control \x00\x01\x7f C1 \x80\x85\x9f replacement \ufffd zero-width \u200b\u200d",
    "CJK 日本語 한국어 Ελληνικά עברית العربية",
    "line one\nline two\r\nthree\n\n",
    "digits 1234567890 and math ∑∫√ and ß é ñ",
    "",
]


def test_special_ids_are_fixed(tok):
    assert tok.vocab_size <= VOCAB["bpe"]
    pieces = [tok.id_to_piece(i) for i in range(9)]
    assert pieces == ["<pad>", "<unk>", "<s>", "</s>", *tk.USER_DEFINED_SYMBOLS]
    assert (tk.PAD_ID, tk.BOS_ID, tk.EOS_ID, tk.END_ID) == (0, 2, 3, 7)
    assert tok.encode("<|user|>hi<|end|>")[0] == tk.USER_ID


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip_any_text(tok, text):
    ids = tok.encode(text)
    assert tk.UNK_ID not in ids
    assert tok.decode(ids) == text


def test_byte_fallback_for_unseen_characters(bpe):
    ids = bpe.encode("😀")
    assert len(ids) == 4  # four UTF-8 bytes
    assert [bpe.id_to_piece(i) for i in ids] == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]


def test_chat_template_ids_and_assistant_mask(bpe):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Who art thou?"},
        {"role": "assistant", "content": "A friend."},
        {"role": "user", "content": "Whence?"},
        {"role": "assistant", "content": "From Verona 😀"},
    ]
    ids, mask = bpe.encode_chat(messages)
    assert ids.dtype == np.int32 and mask.shape == ids.shape
    assert ids[0] == tk.BOS_ID and mask[0] == 0
    role_ids = [i for i in ids.tolist() if i in tk.ROLE_IDS.values()]
    assert role_ids == [tk.SYSTEM_ID, tk.USER_ID, tk.ASSISTANT_ID, tk.USER_ID, tk.ASSISTANT_ID]
    learned = ids[mask == 1]
    assert learned.tolist().count(tk.END_ID) == 2  # each assistant turn learns to stop
    assert bpe.decode(learned) == "A friend.<|end|>From Verona 😀<|end|>"
    assert not np.any(mask[np.isin(ids, list(tk.ROLE_IDS.values()))])
    prompt, prompt_mask = bpe.encode_chat(messages[:2], add_generation_prompt=True)
    assert prompt[-1] == tk.ASSISTANT_ID and not prompt_mask.any()
    np.testing.assert_array_equal(ids[: prompt.size], prompt)
    with pytest.raises(ValueError, match="role 'robot'"):
        bpe.encode_chat([{"role": "robot", "content": "x"}])


def test_last_user_text_of_a_padded_prompt(bpe):
    messages = [
        {"role": "user", "content": "Who art thou?"},
        {"role": "assistant", "content": "A friend."},
        {"role": "user", "content": "Whence?"},
    ]
    for turns, want in ((1, "Who art thou?"), (3, "Whence?")):
        prompt, _ = bpe.encode_chat(messages[:turns], add_generation_prompt=True)
        assert bpe.last_user_text([tk.PAD_ID] * 4 + prompt.tolist()) == want
    with pytest.raises(ValueError, match="no user turn"):
        bpe.last_user_text(bpe.encode_chat(messages[1:2])[0])


def test_save_load_and_pickle(bpe, tmp_path):
    bpe.save(tmp_path / "tok")
    loaded = tk.load_tokenizer(tmp_path / "tok")
    assert loaded.vocab_size == bpe.vocab_size and loaded.fingerprint == bpe.fingerprint
    text = ROUND_TRIP[2]
    assert loaded.encode(text) == bpe.encode(text)
    assert tk.load_tokenizer(tmp_path / "tok" / tk.MODEL_FILE).fingerprint == bpe.fingerprint
    assert pickle.loads(pickle.dumps(bpe)).encode(text) == bpe.encode(text)
    with pytest.raises(FileNotFoundError):
        tk.load_tokenizer(tmp_path / "missing")


def test_check_vocab_refuses_mismatch(bpe):
    tk.check_vocab(bpe.vocab_size, bpe)
    tk.check_vocab(bpe.vocab_size + 64, bpe, allow_padding=True)
    with pytest.raises(ValueError, match=rf"model.vocab_size=256 .* {bpe.vocab_size} pieces"):
        tk.check_vocab(256, bpe)
    with pytest.raises(ValueError, match="does not match"):
        tk.check_vocab(bpe.vocab_size + 64, bpe)


def test_foreign_model_and_tiny_vocab_are_refused():
    writer = io.BytesIO()
    words = (f"word{i} other{i % 7} thing" for i in range(2000))
    spm.SentencePieceTrainer.train(
        sentence_iterator=words, model_writer=writer, vocab_size=60, minloglevel=2
    )
    with pytest.raises(ValueError, match="special pieces"):
        tk.Tokenizer(writer.getvalue())
    with pytest.raises(ValueError, match="too small"):
        tk.train_tokenizer(iter(["a"]), 100)


def test_training_sentences_is_lazy():
    endless = (f"line {i}\n\nsecond line {i}" for i in itertools.count())
    first = list(itertools.islice(tk.training_sentences(endless), 5))
    assert first == ["line 0", "second line 0", "line 1", "second line 1", "line 2"]
    long = list(tk.training_sentences(["x" * 5000]))
    assert [len(s) for s in long] == [2048, 2048, 904]


def test_cli_trains_and_saves(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(corpus_lines(3000)), encoding="utf-8")
    out = tmp_path / "tok"
    argv = ["tokenizer", "--input", str(corpus), "--vocab-size", "400", "--out", str(out)]
    assert cli.main([*argv, "--model-type", "unigram", "--num-threads", "1"]) == 0
    loaded = tk.load_tokenizer(out)
    assert loaded.vocab_size == 400
    assert "set model.vocab_size=400" in capsys.readouterr().out
    assert (out / tk.INFO_FILE).exists()
