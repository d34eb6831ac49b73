"""`flaxlm sample` / `flaxlm chat` on a real (tiny) pretraining checkpoint."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

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


def test_greedy_completion_matches_generate(workdir):
    policy = sample.Policy(str(workdir))
    greedy = sample.generate.SamplingConfig(temperature=0.0)
    text = sample.complete(policy, ["ROMEO:"], False, 6, greedy, 0)[0]
    again = sample.complete(policy, ["ROMEO:", "other"], False, 6, greedy, 5)[0]
    assert text == again  # greedy ignores the key and the rest of the batch


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


def test_chat_streams_replies_and_keeps_history(workdir):
    env = dict(os.environ, PYTHONPATH=str(ROOT), XLA_FLAGS="")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "train.cli",
            "chat",
            "--workdir",
            str(workdir),
            "--max-new-tokens",
            "4",
            "--system",
            "be brief",
        ],
        input="hello\nhow are you\n\n",
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("bot> ") == 2


def test_chat_history_is_trimmed_to_the_context(workdir):
    policy = sample.Policy(str(workdir))
    messages = [{"role": "user", "content": "word " * 40} for _ in range(10)]
    ids = sample.fit_history(policy, messages, max_new_tokens=16)
    assert len(ids) <= policy.config.max_seq_len - 16
    assert len(messages) < 10  # the oldest turns were dropped
