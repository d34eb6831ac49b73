"""rlhf/health.py: the pure checks against hand-computed cases, the monitor's window (no
check fires before W iterations, each warning once), the chat-template check on flaxlm's
and an HF tokenizer, and a tiny GRPO run whose learning rate is too small to change any
parameter, which stops with the zero-update error (random checkpoints: no training first)."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import loader
from model import tokenizer as tk
from model.config import get_preset
from model.transformer import Transformer
from rlhf import grpo, health, tasks
from rlhf.labeler import write_jsonl
from tests.rl_chain import stage_args
from tests.test_pretrained_tokenizer import GEMMA_TEMPLATE, SMOLLM_TEMPLATE, write_dir
from tests.test_rlhf_eval import write_checkpoint
from train.data import pipelines
from train.metrics import read_metrics
from train.reward import CALIBRATION_FILE, reward_model
from train.stage import StageError

W = 3
GRPO = health.Settings("grpo", W, updates=4, lr=1e-4, epochs=2, clip_eps=0.2, group_size=4)
PPO = dataclasses.replace(GRPO, stage="ppo", group_size=0)


@pytest.fixture(scope="module")
def tokenizer() -> tk.Tokenizer:
    corpus = tasks.Addition().pretraining_corpus(np.random.default_rng(0), 20)
    return tk.train_tokenizer(tk.training_sentences(corpus), 400, "char")


def run(settings: health.Settings, series: list[dict]) -> list[list[str]]:
    """Observe each iteration's metrics; the warnings printed at each."""
    lines: list[str] = []
    monitor = health.HealthMonitor(settings, write=lines.append)
    out = [monitor.observe(m) for m in series]
    assert lines == [line for step in out for line in step]
    return out


def user(text: str) -> dict:
    """A stored prompt record (train/data/pipelines.py `conversation`)."""
    return {"roles": ["user"], "contents": [text]}


def healthy(**changes: float) -> dict:
    metrics = {"clip_fraction": 0.1, "update_norm": 0.5, "zero_std_groups": 0.25}
    return {**metrics, "response_length": 10.0, **changes}


# ----------------------------------------------------------------------------- pure functions


def test_pure_checks_hand_computed():
    assert not health.stuck([True, True], 3) and health.stuck([False, True, True, True], 3)
    assert not health.stuck([True, True, False], 3) and not health.stuck([], 1)
    # U = 4 updates per iteration: the first has ratio 1, so the ceiling is 3/4.
    assert health.clip_state(0.0, 4) == "low" and health.clip_state(0.75, 4) == "high"
    assert health.clip_state(0.74, 4) is None and health.clip_state(0.01, 4) is None
    assert health.clip_state(0.0, 1) is None  # one update: the ratio is always 1
    assert health.length_collapsed(1.0, 2.0) and health.length_collapsed(2.4, 10.0)
    assert not health.length_collapsed(2.5, 10.0) and not health.length_collapsed(1.5, 3.0)
    assert health.common_suffix([1, 2, 7, 6], [3, 7, 6]) == (7, 6)
    assert health.common_suffix([1, 2], [3, 4]) == ()
    old = {"w": jnp.ones((2, 2)), "b": jnp.zeros(3)}
    new = {"w": jnp.ones((2, 2)) + 1.0, "b": jnp.asarray([0.0, 0.0, 2.0])}
    assert float(health.update_norm(old, new)) == pytest.approx(np.sqrt(4 + 4))
    assert float(health.update_norm(old, old)) == 0.0


def test_chat_template_check_on_flaxlm_tokenizer(tokenizer):
    suffix = health.chat_suffix(tokenizer)
    assert suffix == (tk.END_ID, tk.ASSISTANT_ID)  # `<|end|><|assistant|>`
    templated = pipelines.tokenize_prompt(user("12+34"), tokenizer, 16)["tokens"]
    raw = np.zeros(16, np.int32)
    ids = tokenizer.encode("12+34")
    raw[16 - len(ids) :] = ids
    np.testing.assert_array_equal(
        health.rows_ending_with(np.stack([raw, templated]), suffix), [False, True]
    )
    health.check_chat_template("grpo", np.stack([raw, templated]), suffix, tokenizer)
    with pytest.raises(StageError) as err:
        health.check_chat_template("grpo", np.stack([raw, raw]), suffix, tokenizer)
    line = str(err.value)
    assert "[7, 6]" in line and "<|end|><|assistant|>" in line and "\n" not in line


@pytest.mark.parametrize(
    ("template", "text"),
    [
        (SMOLLM_TEMPLATE, "<|im_end|>\n<|im_start|>assistant\n"),
        (GEMMA_TEMPLATE, "<end_of_turn>\n<start_of_turn>model\n"),
    ],
)
def test_chat_suffix_of_an_hf_tokenizer(tmp_path, template, text):
    tok = tk.load_tokenizer(write_dir(tmp_path / "tok", template))
    suffix = health.chat_suffix(tok)
    assert tok._tok.decode(list(suffix), skip_special_tokens=False) == text
    row = pipelines.tokenize_prompt(user("And 3+3?"), tok, 48)["tokens"]
    assert bool(health.rows_ending_with(row[None], suffix)[0])
    plain = np.asarray([0] * 40 + tok.encode("And 3+3?"), np.int32)[-48:]
    with pytest.raises(StageError, match="generation prompt"):
        health.check_chat_template("ppo", plain[None], suffix, tok)


# ----------------------------------------------------------------------------- the monitor


def test_no_signal_warns_once_after_w_iterations():
    series = [healthy(zero_std_groups=1.0)] * 2 + [healthy()] + [healthy(zero_std_groups=1.0)] * 5
    out = run(GRPO, series)
    assert [len(x) for x in out] == [0, 0, 0, 0, 0, 1, 0, 0]  # W in a row, then never again
    assert out[5] == [
        "grpo: every group's 4 rewards were equal for 3 iterations: no advantage to learn "
        "from; raise sampling.temperature or grpo.group_size, or check the reward"
    ]
    assert run(PPO, [healthy(zero_std_groups=1.0)] * 5) == [[]] * 5  # PPO has no groups


def test_clip_fraction_stuck_low_or_high():
    out = run(PPO, [healthy(clip_fraction=0.0)] * 4)
    assert [len(x) for x in out] == [0, 0, 1, 0]
    assert out[2][0].startswith("ppo: clip_fraction was 0 for 3 iterations")
    assert "optim.lr (now 0.0001)" in out[2][0] and "ppo.epochs (now 2)" in out[2][0]
    out = run(GRPO, [healthy(clip_fraction=0.75)] * 3 + [healthy(clip_fraction=0.0)] * 3)
    assert [len(x) for x in out] == [0, 0, 1, 0, 0, 1]  # high, then low: two kinds
    assert out[2][0].startswith("grpo: clip_fraction was 0.750 for 3 iterations")
    assert "grpo.clip_eps (now 0.2)" in out[2][0]
    one_update = dataclasses.replace(GRPO, updates=1)
    assert run(one_update, [healthy(clip_fraction=0.0)] * 5) == [[]] * 5


def test_response_length_collapse():
    lengths = [10.0, 2.0, 2.0, 5.0, 2.4, 1.0, 3.0, 0.0, 0.0, 0.0]
    out = run(PPO, [healthy(response_length=x) for x in lengths])
    assert [len(x) for x in out] == [0, 0, 0, 0, 0, 0, 0, 0, 0, 1]  # 3 in a row at last
    out = run(PPO, [healthy(response_length=x) for x in [10.0, 2.0, 2.0, 1.0, 0.5]])
    assert [len(x) for x in out] == [0, 0, 0, 1, 0]
    assert out[3] == [
        "ppo: mean response length fell to 1.0 tokens (first iteration: 10.0) for 3 "
        "iterations: the policy stopped answering; lower optim.lr (now 0.0001), raise "
        "kl.beta, or check the reward"
    ]
    assert run(PPO, [healthy(response_length=1.0)] * 3)[-1]  # <= 1 token from the start


def test_zero_update_stops_after_w_iterations():
    lines: list[str] = []
    monitor = health.HealthMonitor(GRPO, write=lines.append)
    for m in [healthy(update_norm=0.0)] * 2 + [healthy()] + [healthy(update_norm=0.0)] * 2:
        monitor.observe(m)
    with pytest.raises(StageError) as err:
        monitor.observe(healthy(update_norm=0.0))
    assert str(err.value) == (
        "grpo: update_norm was 0 for 3 iterations: the trained parameters never changed; "
        "check optim.lr (now 0.0001) and that they get gradients (model.lora.targets with "
        "LoRA)"
    )
    # Without any group signal the warning comes first and the error names the cause.
    monitor = health.HealthMonitor(GRPO, write=lines.append)
    quiet = healthy(update_norm=0.0, zero_std_groups=1.0)
    monitor.observe(quiet), monitor.observe(quiet)
    with pytest.raises(StageError, match="every group's rewards were equal too"):
        monitor.observe(quiet)
    assert lines[-1].startswith("grpo: every group's 4 rewards were equal")
    # Nor a clip_fraction of 0, which a zero update implies, before the error.
    monitor, count = health.HealthMonitor(PPO, write=lines.append), len(lines)
    for _ in range(2):
        monitor.observe(healthy(update_norm=0.0, clip_fraction=0.0))
    with pytest.raises(StageError):
        monitor.observe(healthy(update_norm=0.0, clip_fraction=0.0))
    assert len(lines) == count


def test_warning_is_one_stderr_line(capsys):
    monitor = health.HealthMonitor(PPO)
    for _ in range(5):
        monitor.observe(healthy(clip_fraction=0.0))
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1, captured.err


def test_config_section_and_switch():
    config = ml_collections.ConfigDict({"health": {"enabled": False, "window": 0}})
    with pytest.raises(loader.ConfigError, match=r"health\.window"):
        health.check_config(config)
    config.health.window = 2
    health.check_config(config)
    step = object()
    assert health.monitored(step, config, "grpo", None) is step  # disabled: untouched


# ----------------------------------------------------------------------------- a stage run


def test_grpo_with_zero_learning_rate_stops(tokenizer, tmp_path, capsys):
    """A learning rate too small for fp32 parameters (optim.lr=0 itself is refused): every
    iteration's update_norm is exactly 0, so the run stops at iteration W with one line
    and exit code 3 (iteration 1 logged, no checkpoint)."""
    cfg = get_preset("tiny", vocab_size=-(-tokenizer.vocab_size // 128) * 128)
    sft = write_checkpoint(tmp_path / "sft", tokenizer, Transformer(cfg), "sft", 1)
    rm = write_checkpoint(tmp_path / "reward", tokenizer, reward_model(cfg), "reward", 3)
    (rm / CALIBRATION_FILE).write_text('{"step": 3, "gain": 1.0, "bias": 0.0}')
    prompts = tmp_path / "prompts.jsonl"
    rng = np.random.default_rng(0)
    write_jsonl(prompts, ({"prompt": p} for p in tasks.Addition().prompts(rng, 32)))
    workdir = tmp_path / "grpo"
    argv = stage_args(
        "grpo.py",
        workdir,
        tmp_path / "tfds",
        f"--config.init_from={sft}",
        f"--config.reward_from={rm}",
        f"--config.data.path={prompts}",
        "--config.optim.lr=1e-30",  # 0 is refused; this vanishes against fp32 params
        "--config.health.window=2",
        "--config.total_steps=4",
        "--config.grpo.group_size=2",
        "--config.grpo.max_new_tokens=4",
        "--config.grpo.epochs=1",  # one update per iteration: the least to compile
        "--config.grpo.minibatches=1",
        "--config.log.peak_flops_per_device=1e12",  # skip measuring the CPU
    )
    assert grpo.main(argv) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        "flaxlm grpo: error: grpo: update_norm was 0 for 2 iterations: the trained parameters "
        "never changed; check optim.lr (now 1e-30) and that they get gradients "
        "(model.lora.targets with LoRA)"
    )
    (logged,) = read_metrics(workdir)
    assert logged["step"] == 1 and logged["update_norm"] == 0.0
    assert logged["zero_std_groups"] < 1.0  # a random reward model: the groups differ
    assert not (workdir / "checkpoints").exists() or not any((workdir / "checkpoints").iterdir())
