"""`flaxlm sample` / `flaxlm chat` on a real (tiny) pretraining checkpoint."""

from __future__ import annotations

import io
import pathlib

import jax
import numpy as np
import pytest

from model.tokenizer import END_ID, EOS_ID
from train import pretrain, sample

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> pathlib.Path:
    path = tmp_path_factory.mktemp("run")
    data_dir = tmp_path_factory.mktemp("tfds")
    code = pretrain.main(
        [
            "--config",
            f"{ROOT}/configs/pretrain.py:tiny",
            "--workdir",
            str(path),
            f"--config.data.data_dir={data_dir}",
            "--config.total_steps=2",
            "--config.optim.warmup_steps=1",
            "--config.eval.every_steps=0",
        ]
    )
    assert code == 0
    return path


def test_sample_prints_one_completion_per_prompt_and_sample(workdir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text('ROMEO:\n{"prompt": "JULIET:"}\n\n')
    code = sample.main_sample(
        [
            "--workdir",
            str(workdir),
            "--prompt",
            "KING:",
            "--prompts-file",
            str(prompts),
            "--num-samples",
            "2",
            "--max-new-tokens",
            "5",
            "--seed",
            "3",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert out.count("=== prompt") == 6
    for name in ("KING:", "ROMEO:", "JULIET:"):
        assert f"\n{name}" in out


def test_sample_is_deterministic_for_a_seed(workdir, capsys):
    argv = ["--workdir", str(workdir), "--prompt", "ROMEO:", "--max-new-tokens", "8"]
    outs = []
    for seed in ("1", "1", "2"):
        assert sample.main_sample([*argv, "--seed", seed]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and outs[0] != outs[2]


def test_sample_with_int8_weights(workdir, capsys):
    argv = ["--workdir", str(workdir), "--prompt", "ROMEO:", "--max-new-tokens", "4"]
    assert sample.main_sample([*argv, "--weight-dtype", "int8"]) == 0
    assert "=== prompt 1, sample 1 ===\nROMEO:" in capsys.readouterr().out


def greedy_without_cache(policy: sample.Policy, ids: list[int], steps: int) -> list[int]:
    """The reference: each step runs the model over the whole sequence so far (no KV
    cache) and appends the argmax of the last real position's logits over the
    tokenizer's vocabulary, up to and including eos. Rows are right-padded to one length
    (one compile); causal attention keeps the padding out of the positions read."""
    vocab, ids, out = policy.tokenizer.vocab_size, list(ids), []
    length = len(ids) + steps
    forward = jax.jit(lambda params, tokens: policy.model.apply({"params": params}, tokens))
    for _ in range(steps):
        tokens = np.zeros((1, length), np.int32)
        tokens[0, : len(ids)] = ids
        logits = np.asarray(forward(policy.params, tokens).logits[0, len(ids) - 1])
        token = int(np.argmax(logits[:vocab]))
        out.append(token)
        if token == policy.tokenizer.eos_id:
            break
        ids.append(token)
    return out


def test_greedy_completion_matches_an_uncached_argmax_loop(workdir):
    policy = sample.Policy(str(workdir))
    tok = policy.tokenizer
    greedy = sample.generate.SamplingConfig(temperature=0.0, vocab_limit=tok.vocab_size)
    reference = greedy_without_cache(policy, [tok.bos_id, *tok.encode("ROMEO:")], 6)
    expected = tok.decode([t for t in reference if t != tok.eos_id])
    assert expected  # at least one real token: the comparison says something
    assert sample.complete(policy, ["ROMEO:"], False, 6, greedy, 0) == [expected]
    # Greedy ignores the key and the other rows of the batch.
    assert sample.complete(policy, ["ROMEO:", "other"], False, 6, greedy, 5)[0] == expected


def test_fused_decode_completion_matches_the_uncached_argmax_loop(workdir, capsys):
    """--decode-impl cpu (model/fused_decode.py): the same greedy tokens as the reference."""
    policy = sample.Policy(str(workdir), decode_impl="cpu")
    tok = policy.tokenizer
    greedy = sample.generate.SamplingConfig(0.0, 0, 1.0, tok.vocab_size, decode_impl="cpu")
    reference = greedy_without_cache(policy, [tok.bos_id, *tok.encode("ROMEO:")], 6)
    expected = tok.decode([t for t in reference if t != tok.eos_id])
    assert sample.complete(policy, ["ROMEO:", "other"], False, 6, greedy, 0)[0] == expected
    # A "cpu" sampling config cannot run a policy whose params sit on the 8-device mesh.
    default_path = sample.Policy(str(workdir))
    with pytest.raises(ValueError, match="decode_impl='cpu' but the policy was loaded for 'xla'"):
        sample.complete(default_path, ["ROMEO:"], False, 6, greedy, 0)
    argv = ["--workdir", str(workdir), "--prompt", "ROMEO:", "--max-new-tokens", "4"]
    assert sample.main_sample([*argv, "--decode-impl", "cpu", "--weight-dtype", "int8"]) == 2
    assert "int8 weights" in capsys.readouterr().err


def test_decode_completion_drops_stop_markers_and_padded_ids(workdir):
    tok = sample.Policy(str(workdir)).tokenizer
    ids = tok.encode("ab")
    tokens = [*ids, END_ID, EOS_ID, tok.vocab_size + 3]
    assert sample.decode_completion(tok, tokens, [True] * len(tokens)) == "ab"


def test_bad_input_is_one_line(workdir, tmp_path, capsys):
    assert sample.main_sample(["--workdir", str(tmp_path), "--prompt", "x"]) == 2
    assert "holds no checkpoint" in capsys.readouterr().err
    assert sample.main_sample(["--workdir", str(workdir)]) == 2
    assert "--prompt" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x"}\n')
    assert sample.main_sample(["--workdir", str(workdir), "--prompts-file", str(bad)]) == 2
    assert "bad.jsonl:1" in capsys.readouterr().err


def test_chat_streams_replies_and_keeps_history(workdir, monkeypatch, capsys):
    """Two turns through `flaxlm chat`: each turn's prompt is exactly the chat template
    over the whole conversation so far (system, both user turns, the first reply as
    printed), and each reply printed is the decoded stream."""
    prompts, replies = [], []
    stream = sample.stream_reply

    def recording_stream(policy, ids, *args):
        prompts.append(list(ids))
        replies.append(list(stream(policy, ids, *args)))
        yield from replies[-1]

    monkeypatch.setattr(sample, "stream_reply", recording_stream)
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\nhow are you\n\n"))
    argv = ["--workdir", str(workdir), "--max-new-tokens", "4", "--system", "be brief"]
    assert sample.main_chat(argv) == 0
    out = capsys.readouterr().out
    tok = sample.Policy(str(workdir)).tokenizer
    texts = [tok.decode([t for t in r if t < tok.vocab_size]) for r in replies]
    history = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    first = tok.encode_chat(history, add_generation_prompt=True)[0].tolist()
    history += [
        {"role": "assistant", "content": texts[0]},
        {"role": "user", "content": "how are you"},
    ]
    second = tok.encode_chat(history, add_generation_prompt=True)[0].tolist()
    assert prompts == [first, second]
    assert second[: len(first) - 1] == first[:-1]  # the first turn, then its reply
    assert out.count("bot> ") == 2
    for text in texts:
        assert f"bot> {text}\n" in out


def test_chat_with_the_fused_step_replies_as_the_default_step(workdir, monkeypatch, capsys):
    """Greedy chat: --decode-impl cpu (model/fused_decode.py) prints the same reply."""
    replies = []
    for impl in ("xla", "cpu"):
        monkeypatch.setattr("sys.stdin", io.StringIO("hello\n\n"))
        argv = ["--workdir", str(workdir), "--max-new-tokens", "6", "--temperature", "0"]
        assert sample.main_chat([*argv, "--decode-impl", impl]) == 0
        replies.append(capsys.readouterr().out)
    reply = replies[0].split("bot> ", 1)[1]
    assert reply.strip(), "an empty reply would make the comparison say nothing"
    assert replies[0] == replies[1]


def test_chat_history_is_trimmed_to_the_context(workdir):
    """Whole oldest exchanges are dropped until the template fits, the system turn is
    kept, and a last turn too long to fit alone is refused (never cut)."""
    policy = sample.Policy(str(workdir))
    tok, room = policy.tokenizer, policy.config.max_seq_len - 16

    system = [{"role": "system", "content": "be brief"}]
    last = [{"role": "user", "content": "last"}]
    exchanges = [
        [{"role": "user", "content": f"word{i} " * 3}, {"role": "assistant", "content": "ok"}]
        for i in range(10)
    ]

    def render_keeping(k: int) -> list[int]:  # system, the newest k exchanges, last turn
        turns = system + [m for pair in exchanges[len(exchanges) - k :] for m in pair] + last
        return tok.encode_chat(turns, add_generation_prompt=True)[0].tolist()

    ids = sample.fit_history(policy, render_turns(system, exchanges, last), max_new_tokens=16)
    fits = [k for k in range(11) if render_keeping(k) == ids]
    assert len(fits) == 1 and 1 <= fits[0] < 10  # some, not all, exchanges kept whole
    assert len(ids) <= room < len(render_keeping(fits[0] + 1))
    long = [{"role": "user", "content": "word " * 100}]
    with pytest.raises(ValueError, match="max_seq_len - max_new_tokens"):
        sample.fit_history(policy, long, max_new_tokens=16)


def render_turns(system: list, exchanges: list, last: list) -> list[dict]:
    return system + [m for pair in exchanges for m in pair] + last


def test_chat_refuses_a_turn_too_long_and_goes_on(workdir, monkeypatch, capsys):
    """A user turn longer than the context is named on stderr and left out of the
    history; the next turn is answered."""
    monkeypatch.setattr("sys.stdin", io.StringIO("word " * 100 + "\nhello\n\n"))
    argv = ["--workdir", str(workdir), "--max-new-tokens", "4"]
    assert sample.main_chat(argv) == 0
    captured = capsys.readouterr()
    assert "max_seq_len - max_new_tokens" in captured.err
    assert captured.out.count("bot> ") == 1
