"""Reward model: the K-wise loss against plain loops, Kendall τ against scipy, gradients
that skip padded responses, and `flaxlm reward` / `flaxlm score` end to end on a
synthetic ranking task with a hidden rule."""

from __future__ import annotations

import itertools
import json
import math
import os
import pathlib
import random
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from scipy import stats

from model import tokenizer as tk
from model.config import get_preset
from tests.test_sft import write_parent
from train import reward
from train import reward_losses as rl
from train.data import pipelines
from train.metrics import read_metrics
from train.parent import read_parent

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "reward.py")
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
# The hidden rule: a response is three animal words; its quality is the sum of the words'
# indices in this list. Rankings follow it (ties share a rank); the model sees only them.
WORDS = ["cat", "dog", "owl", "bee", "fox", "ant", "elk", "yak"]


# ----------------------------------------------------------------------------- pure math


def random_batch(rng: np.random.Generator, B: int, K: int, ties: bool = True):
    rewards = rng.normal(size=(B, K)).astype(np.float32) * 2
    ranks = rng.integers(0, K - 1 if ties else K, size=(B, K)).astype(np.int32)
    if not ties:
        ranks = np.stack([rng.permutation(K) for _ in range(B)]).astype(np.int32)
    sizes = rng.integers(1, K + 1, size=B)  # K_b from 1 (no pair) to K
    mask = (np.arange(K)[None, :] < sizes[:, None]).astype(np.float32)
    ranks = np.where(mask > 0, ranks, -1)
    return rewards, ranks, mask


def loop_loss(rewards, ranks, mask, margin=0.0, center=0.0) -> float:
    """The InstructGPT loss written as plain Python loops over every pair of every prompt."""
    total, prompts = 0.0, 0
    for b in range(rewards.shape[0]):
        real = [k for k in range(rewards.shape[1]) if mask[b, k]]
        weight = 1.0 / math.comb(len(real), 2) if len(real) >= 2 else 0.0
        loss, pairs = 0.0, 0
        for i in real:
            for j in real:
                if ranks[b, i] < ranks[b, j]:
                    diff = float(rewards[b, i]) - float(rewards[b, j]) - margin
                    loss += -math.log(1.0 / (1.0 + math.exp(-diff))) * weight
                    pairs += 1
        if pairs:
            mean = sum(float(rewards[b, k]) for k in real) / len(real)
            total += loss + center * mean * mean
            prompts += 1
    return total / max(prompts, 1)


@pytest.mark.parametrize("margin, center", [(0.0, 0.0), (0.5, 0.0), (0.0, 0.1), (1.0, 0.05)])
def test_kwise_loss_equals_a_double_loop_over_pairs(margin, center):
    rewards, ranks, mask = random_batch(np.random.default_rng(0), B=16, K=5)
    mask[3] = 0.0  # an all-padding row (end of a finite run)
    ranks[3] = -1
    total, prompts = rl.ranking_loss(rewards, ranks, mask, margin, center)
    expected = loop_loss(rewards, ranks, mask, margin, center)
    np.testing.assert_allclose(float(total / prompts), expected, rtol=1e-6, atol=1e-6)


def test_padded_responses_change_nothing():
    rewards, ranks, mask = random_batch(np.random.default_rng(1), B=8, K=4)
    noisy = np.where(mask > 0, rewards, 1e4 * np.random.default_rng(2).normal(size=rewards.shape))
    a = rl.ranking_loss(rewards, ranks, mask, 0.3, 0.1)
    b = rl.ranking_loss(noisy.astype(np.float32), ranks, mask, 0.3, 0.1)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    def mean_loss(r):
        total, prompts = rl.ranking_loss(r, ranks, mask, 0.3, 0.1)
        return total / prompts

    grad = np.asarray(jax.grad(mean_loss)(jnp.asarray(noisy, jnp.float32)))
    assert np.all(grad[mask == 0] == 0.0) and np.any(grad[mask > 0] != 0.0)


def test_k2_is_the_bradley_terry_loss():
    rng = np.random.default_rng(3)
    chosen, rejected = (
        rng.normal(size=64).astype(np.float32),
        rng.normal(size=64).astype(np.float32),
    )
    swap = rng.random(64) < 0.5  # chosen sits in either slot
    rewards = np.where(
        swap[:, None], np.stack([rejected, chosen], 1), np.stack([chosen, rejected], 1)
    )
    ranks = np.where(swap[:, None], [[1, 0]], [[0, 1]]).astype(np.int32)
    total, prompts = rl.ranking_loss(rewards, ranks, np.ones((64, 2), np.float32))
    reference = np.mean(np.log1p(np.exp(-(chosen.astype(np.float64) - rejected))))
    np.testing.assert_allclose(float(total / prompts), reference, rtol=1e-6)
    np.testing.assert_allclose(float(rl.bradley_terry_loss(chosen, rejected)), reference, rtol=1e-6)


def test_kendall_tau_and_pair_accuracy_match_references():
    rewards, ranks, mask = random_batch(np.random.default_rng(4), B=32, K=6)
    rewards[0, :2] = 1.5  # a tie in the predictions
    tau, valid = rl.kendall_tau(rewards, ranks, mask)
    got = rl.ranking_stats(rewards, ranks, mask)
    correct = pairs = 0.0
    for b in range(32):
        real = mask[b] > 0
        x, y = rewards[b, real], -ranks[b, real]
        if real.sum() >= 2 and len(set(y)) > 1 and len(set(x)) > 1:
            assert valid[b] == 1
            np.testing.assert_allclose(float(tau[b]), stats.kendalltau(x, y).statistic, atol=1e-6)
        else:
            assert valid[b] == 0
        for i, j in itertools.permutations(np.flatnonzero(real), 2):
            if ranks[b, i] < ranks[b, j]:
                pairs += 1
                correct += (
                    1.0 if rewards[b, i] > rewards[b, j] else 0.5 * (rewards[b, i] == rewards[b, j])
                )
    assert float(got["pairs"]) == pairs
    np.testing.assert_allclose(float(got["correct"]), correct)


def test_fit_gain_bias_standardizes():
    raw = np.random.default_rng(5).normal(3.0, 7.0, size=500)
    gain, bias = rl.fit_gain_bias(raw)
    calibrated = gain * raw + bias
    assert abs(calibrated.mean()) < 1e-5 and abs(calibrated.std() - 1.0) < 1e-5


# ----------------------------------------------------------------------------- the model


@pytest.fixture(scope="module")
def tokenizer():
    with open(SHAKESPEARE, encoding="utf-8") as f:
        return tk.train_tokenizer(tk.training_sentences(itertools.islice(f, 2000)), 4096, "char")


def ranked_record(rng: random.Random, k: int) -> dict:
    while True:
        responses = [" ".join(rng.choice(WORDS) for _ in range(3)) for _ in range(k)]
        quality = [sum(WORDS.index(w) for w in r.split()) for r in responses]
        distinct = sorted(set(quality), reverse=True)
        if len(distinct) > 1:
            prompt = "rate: " + "".join(rng.choice("ABCDEFGH") for _ in range(4))
            ranking = [distinct.index(q) for q in quality]
            return {"prompt": prompt, "responses": responses, "ranking": ranking}


def test_gradients_reach_the_head_and_backbone_not_padded_responses(tokenizer):
    cfg = get_preset("tiny", vocab_size=384)
    model = reward.reward_model(cfg)
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    params = nn.unbox(params)
    assert "lm_head" not in params and {"scalar_head", "scalar_bias"} <= set(params)
    rng = random.Random(0)
    records = [ranked_record(rng, k) for k in (2, 3, 4, 3)]
    rows = [
        pipelines.tokenize_ranked(
            {
                "roles": ["user"],
                "contents": [r["prompt"]],
                "responses": r["responses"],
                "ranks": r["ranking"],
            },
            tokenizer,
            32,
            4,
        )
        for r in records
    ]
    batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    assert batch["response_mask"].sum() == 12  # 4 slots padded

    def loss(p, b):
        total, prompts = rl.ranking_loss(
            rl.compute_rewards(model, p, b, "last"), b["ranks"], b["response_mask"]
        )
        return total / prompts

    value_and_grad = jax.jit(jax.value_and_grad(loss))
    value, grads = value_and_grad(params, batch)
    # Garbage in padded response slots and in the pad tail of real responses.
    noisy = dict(batch)
    garbage = np.random.default_rng(0).integers(9, 300, size=batch["tokens"].shape)
    noisy["tokens"] = np.where(batch["segment_ids"] > 0, batch["tokens"], garbage).astype(np.int32)
    assert not np.array_equal(noisy["tokens"], batch["tokens"])
    value2, grads2 = value_and_grad(params, noisy)
    assert float(value) == float(value2)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads2), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    norms = {k: float(optax.tree.norm(v)) for k, v in grads.items()}
    assert norms["scalar_head"] > 0 and norms["layers"] > 0 and norms["embedding"] > 0
    # The reward reads the per-token scalars of the response only: "last" its `<|end|>`
    # (the last real token), "mean" every response token; no other token gets a gradient.
    B, K, T = batch["tokens"].shape
    mask = batch["completion_mask"].reshape(B * K, T)
    scalars = jnp.asarray(np.random.default_rng(1).normal(size=(B * K, T)), jnp.float32)
    last = batch["segment_ids"].sum(-1) - 1
    for pool in rl.POOLS:

        def from_scalars(s, pool=pool):
            r = rl.pool_rewards(s, mask, pool).reshape(B, K)
            r = jnp.where(batch["response_mask"] > 0, r, 0.0)
            total, prompts = rl.ranking_loss(r, batch["ranks"], batch["response_mask"])
            return total / prompts

        g = np.asarray(jax.jit(jax.grad(from_scalars))(scalars)).reshape(B, K, T)
        expected = np.zeros((B, K, T), bool)
        for b, k in zip(*np.nonzero(batch["response_mask"]), strict=True):
            if pool == "last":
                expected[b, k, last[b, k]] = True
            else:
                expected[b, k] = batch["completion_mask"][b, k] > 0
        assert np.all((g != 0) == expected), pool


def loop_pool(values: np.ndarray, mask: np.ndarray, pool: str) -> np.ndarray:
    """Plain-loop reference of `pool_rewards`: the last run of marked tokens per row."""
    out = np.zeros(values.shape[0])
    for i, (row, marks) in enumerate(zip(values, mask, strict=True)):
        run: list[int] = []
        for t, marked in enumerate(marks):
            if marked:
                run = [*run, t] if run and run[-1] == t - 1 else [t]
        if run:
            out[i] = row[run[-1]] if pool == "last" else np.mean(row[run])
    return out


def test_pool_rewards_matches_a_loop_on_multi_turn_rows():
    rng = np.random.default_rng(0)
    values = rng.normal(size=(5, 9)).astype(np.float32)
    mask = np.array(
        [
            [0, 0, 0, 1, 1, 1, 0, 0, 0],  # prompt, response, padding
            [0, 1, 1, 0, 0, 1, 1, 1, 1],  # an earlier assistant turn, then the response
            [1, 1, 1, 1, 1, 1, 1, 1, 1],
            [0, 0, 0, 0, 0, 0, 0, 0, 1],
            [0, 0, 0, 0, 0, 0, 0, 0, 0],  # no response: reads 0
        ]
    )
    for pool in rl.POOLS:
        got = np.asarray(rl.pool_rewards(jnp.asarray(values), jnp.asarray(mask), pool))
        np.testing.assert_allclose(got, loop_pool(values, mask, pool), rtol=1e-6, atol=1e-7)
    assert float(rl.pool_rewards(jnp.asarray(values), jnp.asarray(mask), "mean")[1]) == (
        pytest.approx(float(values[1, 5:].mean()), rel=1e-6)
    )
    with pytest.raises(ValueError, match="'max'"):
        rl.pool_rewards(jnp.asarray(values), jnp.asarray(mask), "max")


# ----------------------------------------------------------------------------- the stage


def test_ppo_reads_a_rollout_as_the_reward_stage_reads_the_text(tokenizer):
    """PPO's read of a rollout (rlhf/ppo_learner.py `reward_scores`: left-padded prompt,
    sampled tokens, right padding) equals the reward stage's read of the same conversation
    (`score_texts`, the training layout), for each pool; the pools differ."""
    from model import sharding as sh
    from rlhf import ppo_learner, rollout

    cfg = get_preset("tiny", vocab_size=384)
    model = reward.reward_model(cfg)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(1), jnp.zeros((1, 8), jnp.int32)))
    params = params["params"]
    items = [("rate: ABCD", "cat dog owl"), ("rate: HG", "bee")]
    P, N = 16, 16
    prompts, responses, masks = [], [], []
    for prompt, response in items:
        ids, _ = tokenizer.encode_chat([{"role": "user", "content": prompt}], True)
        prompts.append(np.pad(ids, (P - ids.size, 0), constant_values=tk.PAD_ID))
        body = [*tokenizer.encode(response), tk.END_ID]
        responses.append(np.pad(body, (0, N - len(body)), constant_values=tk.PAD_ID))
        masks.append(np.arange(N) < len(body))
    prompt_tokens = jnp.asarray(np.stack(prompts), jnp.int32)
    batch = rollout.Rollout(
        prompt_tokens,
        (prompt_tokens != tk.PAD_ID).astype(jnp.int32),
        jnp.asarray(np.stack(responses), jnp.int32),
        jnp.zeros((len(items), N), jnp.float32),
        jnp.asarray(np.stack(masks)),
        jnp.ones(len(items), bool),
    )
    mesh = sh.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    conversations = [([{"role": "user", "content": p}], r) for p, r in items]
    read = {}
    for pool in rl.POOLS:
        by_ppo = np.asarray(ppo_learner.reward_scores(model, params, batch, pool))
        by_stage = reward.score_texts(
            model, params, tokenizer, conversations, 32, mesh, sh.get_rules("dp"), pool
        )
        np.testing.assert_allclose(by_ppo, by_stage, rtol=1e-5, atol=1e-5)
        read[pool] = by_stage
    assert not np.allclose(read["last"], read["mean"])


def test_reward_pool_comes_from_the_checkpoint_config():
    from train.parent import Parent

    def parent(config: dict) -> Parent:
        return Parent(pathlib.Path("/x/checkpoints/1"), 1, {"model": {"d_model": 8}, **config})

    assert reward.reward_pool(parent({"config": {"reward": {"pool": "mean"}}})) == "mean"
    # Checkpoints from before the key existed were trained with the last-token read.
    assert reward.reward_pool(parent({"config": {"reward": {"margin": 0.0}}})) == "last"
    assert reward.reward_pool(parent({})) == "last"


def write_jsonl(path: pathlib.Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tokenizer):
    """One `flaxlm reward` run: 60 steps of 16 prompts with 2-4 ranked responses each."""
    root = tmp_path_factory.mktemp("reward")
    parent, _ = write_parent(root / "parent", tokenizer)
    rng = random.Random(0)
    train = [ranked_record(rng, rng.choice([2, 3, 4])) for _ in range(2000)]
    heldout = [ranked_record(rng, rng.choice([2, 3, 4])) for _ in range(128)]
    workdir = root / "run"
    argv = [
        "--config",
        f"{CONFIG}:tiny",
        "--workdir",
        str(workdir),
        f"--config.init_from={parent}",
        f"--config.data.path={write_jsonl(root / 'train.jsonl', train)}",
        f"--config.eval.path={write_jsonl(root / 'heldout.jsonl', heldout)}",
        f"--config.data.data_dir={root / 'tfds'}",
        "--config.total_steps=60",
        "--config.eval.every_steps=30",
        "--config.eval.max_batches=0",  # every held-out prompt
        "--config.calibration.num_samples=16",
    ]
    assert reward.main(argv) == 0
    return {"parent": parent, "workdir": workdir, "argv": argv}


def test_reward_model_learns_the_hidden_rule(trained):
    lines = read_metrics(trained["workdir"])
    final = [x for x in lines if "eval_pair_accuracy" in x][-1]
    print(
        f"held-out pairwise accuracy {final['eval_pair_accuracy']:.4f} "
        f"({final['eval_pairs']:.0f} pairs), Kendall tau {final['eval_kendall_tau']:.4f} "
        f"at step {final['step']}"
    )
    assert final["step"] == 60 and final["eval_pairs"] > 200
    assert final["eval_pair_accuracy"] >= 0.95
    assert final["eval_kendall_tau"] > 0.8
    for key in ("eval_loss", "eval_margin", "eval_reward_mean", "eval_reward_std"):
        assert math.isfinite(final[key]), key
    train = [x for x in lines if "loss" in x]
    for key in ("pair_accuracy", "margin", "kendall_tau", "reward_mean", "grad_norm"):
        assert key in train[-1], key


def test_reward_run_records_lineage_and_calibration(trained):
    workdir = trained["workdir"]
    own = read_parent(workdir)
    assert own.stage == "reward" and own.step == 60
    assert own.meta["lineage"]["parent"] == str(trained["parent"] / "checkpoints" / "3")
    assert own.meta["lineage"]["parent_lineage"]["stage"] == "pretrain"
    assert (workdir / "tokenizer" / "tokenizer.model").is_file()
    calibration = reward.load_calibration(workdir)
    assert calibration["step"] == 60 and calibration["num_samples"] == 16
    assert calibration["policy"] == str(trained["parent"] / "checkpoints" / "3")
    gain, bias = calibration["gain"], calibration["bias"]
    assert abs(gain * calibration["raw_mean"] + bias) < 1e-6
    assert abs(gain * calibration["raw_std"] - 1.0) < 1e-6
    logged = [x for x in read_metrics(workdir) if "calibration_gain" in x]
    assert logged and logged[-1]["step"] == 60


def test_a_stop_between_calibration_file_and_line_is_repaired_on_rerun(trained, tmp_path):
    """A signal after the calibration file was written but before its metrics line (the
    fault suite's whole-pipeline case found one): the rerun logs the line, once."""
    import shutil

    workdir = tmp_path / "run"
    shutil.copytree(trained["workdir"], workdir)
    path = workdir / "metrics.jsonl"
    lines = path.read_text().splitlines()
    kept = [line for line in lines if "calibration_gain" not in line]
    assert len(kept) == len(lines) - 1
    path.write_text("".join(line + "\n" for line in kept))
    argv = [str(workdir) if a == str(trained["workdir"]) else a for a in trained["argv"]]
    assert reward.main(argv) == 0  # "already finished": calibration found, line written
    assert path.read_text().splitlines() == lines  # the same line back, at the end
    assert reward.main(argv) == 0
    assert path.read_text().splitlines() == lines  # and only once


def test_score_prints_calibrated_rewards_in_order(trained):
    env = dict(os.environ, PYTHONPATH=str(ROOT), XLA_FLAGS="")
    responses = ["yak yak yak", "fox elk owl", "cat cat cat"]  # quality 21, 12, 0
    argv = ["--workdir", str(trained["workdir"]), "--prompt", "rate: ABCD"]
    argv += [x for r in responses for x in ("--response", r)]
    result = subprocess.run(
        [sys.executable, "-m", "orchestrate.cli", "score", *argv],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    calibrated = [float(x) for x in result.stdout.split()]
    assert len(calibrated) == 3 and calibrated[0] > calibrated[1] > calibrated[2]
    raw = reward.score_workdir(trained["workdir"], "rate: ABCD", responses, calibrated=False)
    c = reward.load_calibration(trained["workdir"])
    np.testing.assert_allclose(calibrated, c["gain"] * raw + c["bias"], atol=2e-6)


def test_score_refuses_a_workdir_that_is_not_a_reward_model(trained, capsys):
    code = reward.score_main(
        ["--workdir", str(trained["parent"]), "--prompt", "x", "--response", "y"]
    )
    assert code == 2
    assert "is a pretrain checkpoint, not a reward model" in capsys.readouterr().err


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.reward.max_responses=1", "reward.max_responses=1: must be >= 2"),
        ("--config.reward.pool=max", "reward.pool='max': choose from ('last', 'mean')"),
        ("--config.calibration.temperature=-1", "calibration: sampling.temperature=-1.0"),
        ("--config.reward.margn=1", "--config.reward.margn: unknown key"),
        ("--config.init_from=/nonexistent", "init_from=/nonexistent: no such workdir"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, override, message):
    workdir = tmp_path / "run"
    argv = ["--config", f"{CONFIG}:tiny", "--workdir", str(workdir), "--config.eval.path=x"]
    assert reward.main([*argv, override]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not workdir.exists()
