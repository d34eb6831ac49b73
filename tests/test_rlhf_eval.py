"""rlhf/evaluate.py (best-of-n, its analytic KL, the RM's pairwise accuracy against the
oracle), `flaxlm rlhf-eval`, and PPO with the oracle as reward (`ppo.reward=oracle`).

Fast tests run on random tiny checkpoints written here (seconds, no training) with a
graded test oracle; the slow ones run on test_ppo.py's trained pretrain → SFT → reward
chain on Addition and print the measured figures.
"""

from __future__ import annotations

import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from model import sharding as sh
from model import tokenizer as tk
from model.config import get_preset
from model.transformer import Transformer
from orchestrate import cli
from rlhf import evaluate as ev
from rlhf import kl as kl_lib
from rlhf import policy_stage, ppo, tasks
from rlhf import ppo_math as pm
from rlhf import ppo_reward as pr
from rlhf.labeler import write_jsonl
from tests.test_ppo import chain, ppo_args  # noqa: F401  (chain: a module-scoped fixture)
from tests.test_ppo import stage_args as ppo_stage_args
from train.checkpoint import Checkpointer
from train.metrics import read_metrics
from train.parent import lineage
from train.reward import CALIBRATION_FILE, reward_model
from train.stage import parse_stage_args
from train.state import init_params_fn

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
TEST_TASK = "tests.test_rlhf_eval:DigitShare"


class DigitShare(tasks.Addition):
    """Addition prompts; the oracle is the share of digits in the response, so even a
    random policy's samples get graded scores in [0, 1] (ties rarer than with Addition)."""

    def score(self, prompt: str, response: str) -> float:
        del prompt
        return sum(c.isdigit() for c in response) / len(response) if response else 0.0


# ----------------------------------------------------------------------------- pure statistics


def test_best_of_n_picks_the_argmax():
    rng = np.random.default_rng(0)
    rm, oracle = rng.normal(size=(7, 16)), rng.random((7, 16))
    rm[3, 5] = rm[3, 9] = rm[3].max() + 1.0  # a tie: the first one wins, as np.argmax
    out = ev.best_of_n(rm, oracle)
    rm_pick, oracle_pick = [], []
    for i in range(7):  # a plain loop
        best, best_j = -np.inf, -1
        for j in range(16):
            if rm[i, j] > best:
                best, best_j = rm[i, j], j
        rm_pick.append(best_j)
        oracle_pick.append(max(range(16), key=lambda j, i=i: (oracle[i, j], -j)))
    assert out["rm_chosen"] == rm_pick and rm_pick[3] == 5
    assert out["oracle_chosen"] == oracle_pick
    assert out["rm_chosen_oracle_score"] == pytest.approx(np.mean(oracle[range(7), rm_pick]))
    assert out["oracle_chosen_oracle_score"] == pytest.approx(np.mean(oracle.max(axis=1)))
    assert out["mean_oracle_score"] == pytest.approx(oracle.mean())
    assert out["n"] == 16 and out["kl"] == ev.best_of_n_kl(16)


def test_best_of_n_kl():
    assert ev.best_of_n_kl(1) == 0.0
    # log 16 - 15/16 = 2.772589 - 0.9375
    assert ev.best_of_n_kl(16) == pytest.approx(1.8350887222397811, abs=1e-12)
    assert ev.best_of_n_kl(2) == pytest.approx(math.log(2) - 0.5)
    with pytest.raises(ValueError):
        ev.best_of_n_kl(0)


def test_rm_pairwise_accuracy_hand_computed():
    # Prompt 0: oracle 1, .5, .5, 0 -> 5 untied pairs (the .5/.5 tie excluded). RM orders
    # (0 > 1) right, (0 > 2) wrong, (0 > 3) right, (1 > 3) an RM tie -> ½, (2 > 3) right.
    # Prompt 1: every oracle score equal -> no pair. Prompt 2: one pair, wrong.
    oracle = np.array([[1.0, 0.5, 0.5, 0.0], [0.3] * 4, [0.0, 1.0, 0.0, 0.0]])
    rm = np.array([[2.0, 1.0, 3.0, 1.0], [4.0, 3.0, 2.0, 1.0], [0.0, -1.0, 0.0, 0.0]])
    out = ev.rm_pairwise_accuracy(rm, oracle)
    # Prompt 2's oracle has 3 tied zeros, so its untied pairs are (1, 0), (1, 2), (1, 3):
    # all wrong (rm[1] = -1 is the lowest).
    assert out["pairs"] == 5 + 0 + 3
    assert out["accuracy"] == pytest.approx((3.5 + 0 + 0) / 8)
    assert ev.rm_pairwise_accuracy(rm[1:2], oracle[1:2]) == {"accuracy": None, "pairs": 0}
    with pytest.raises(ValueError):
        ev.rm_pairwise_accuracy(rm, oracle[:2])


def test_oracle_scores_shape():
    task = tasks.Addition()
    out = ev.oracle_scores(task, ["12+19", "47+38"], [["31", "21"], ["85", "75"]])
    np.testing.assert_array_equal(out, [[1.0, 0.25], [1.0, 0.25]])


def test_oracle_reward_without_task_is_one_line(tmp_path, capsys):
    workdir = tmp_path / "ppo"
    argv = [
        "--config",
        f"{CONFIGS / 'ppo.py'}:tiny",
        "--workdir",
        str(workdir),
        f"--config.init_from={tmp_path / 'missing_sft'}",
        f"--config.reward_from={tmp_path / 'missing_rm'}",
        "--config.ppo.reward=oracle",
    ]
    assert ppo.main(argv) == 2
    err = capsys.readouterr().err
    assert "ppo.reward=oracle needs task" in err and len(err.strip().splitlines()) == 1, err
    assert not workdir.exists()
    assert ppo.main([*argv[:-1], "--config.ppo.reward=gold"]) == 2
    assert "ppo.reward='gold'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- random runs


def write_checkpoint(
    workdir: pathlib.Path, tokenizer: tk.Tokenizer, model: Transformer, stage: str, seed: int
) -> pathlib.Path:
    """A random checkpoint at step 3 with this tokenizer, as a stage writes it (parameters
    only: every reader here takes `params` from the state). Drawn with numpy from the
    abstract shapes (norm scales 1): no compilation, so the fixture takes a second."""
    init = init_params_fn(model, jnp.zeros((1, 8), jnp.int32))
    shapes = nn.unbox(jax.eval_shape(init, jax.random.key(0)))
    rng = np.random.default_rng(seed)

    def draw(path: tuple, leaf: jax.ShapeDtypeStruct) -> np.ndarray:
        name = jax.tree_util.keystr(path)
        std = 0.0 if "bias" in name else 0.3 if "embedding" in name else 0.1
        if "scale" in name:
            return np.ones(leaf.shape, leaf.dtype)
        return rng.normal(0.0, std, leaf.shape).astype(leaf.dtype)

    params = jax.tree_util.tree_map_with_path(draw, shapes)
    tokenizer.save(workdir / "tokenizer")
    meta = {
        "stage": stage,
        "config": {"seq_len": 24},
        "model": model.config.to_dict(),
        "tokenizer": {"path": "tokenizer", "fingerprint": tokenizer.fingerprint},
        "lineage": lineage(stage),
    }
    checkpointer = Checkpointer(workdir, async_save=False)
    checkpointer.save(3, {"params": params}, {}, meta)
    checkpointer.close()
    return workdir


@pytest.fixture(scope="module")
def random_runs(tmp_path_factory) -> dict:
    """Random tiny SFT, reward (calibration gain 2, bias -1) and policy checkpoints on a
    character tokenizer of the Addition corpus, plus prompt files."""
    root = tmp_path_factory.mktemp("random_runs")
    task, rng = DigitShare(), np.random.default_rng(0)
    corpus = task.pretraining_corpus(rng, 20)
    tokenizer = tk.train_tokenizer(tk.training_sentences(corpus), 4096, "char")
    cfg = get_preset("tiny", vocab_size=-(-tokenizer.vocab_size // 128) * 128)
    sft_dir = write_checkpoint(root / "sft", tokenizer, Transformer(cfg), "sft", 1)
    policy_dir = write_checkpoint(root / "policy", tokenizer, Transformer(cfg), "ppo", 2)
    rm_dir = write_checkpoint(root / "reward", tokenizer, reward_model(cfg), "reward", 3)
    calibration = {"step": 3, "gain": 2.0, "bias": -1.0, "max_new_tokens": 6}
    (rm_dir / CALIBRATION_FILE).write_text(json.dumps(calibration))
    prompts = root / "prompts.jsonl"
    write_jsonl(prompts, ({"prompt": p} for p in task.prompts(rng, 64)))
    return {
        "root": root,
        "sft": sft_dir,
        "policy": policy_dir,
        "reward": rm_dir,
        "prompts": prompts,
        "tokenizer": tokenizer,
    }


def check_oracle_experience(
    parts: dict, task: tasks.PreferenceTask, config, spread: bool = True
) -> None:
    """One rollout through the built step's scoring: the last-token reward is the task's
    oracle on the decoded texts (minus the eos penalty), and rm_score is the reward model's."""
    state, mesh, rules = parts.state, parts.mesh, parts.rules
    batch = parts.to_device(next(parts.batches))
    with sh.sharding_context(mesh, rules):
        rollout = policy_stage.sample_rollout(
            parts.extras["models"],
            state.params,
            batch,
            jax.random.key(7),
            config.ppo.max_new_tokens,
            parts.extras["sampling"],
            mesh,
            rules,
            parts.tokenizer,
        )
    beta = state.kl_coef
    scored, exp, metrics, scores = parts.extras["scoring"](state, rollout, beta)
    prompts, responses = pr.rollout_texts(parts.tokenizer, rollout)
    oracle = np.array([task.score(p, r) for p, r in zip(prompts, responses, strict=True)])
    assert not spread or np.unique(oracle).size > 1, oracle  # a check that could fail
    np.testing.assert_allclose(np.asarray(scores), oracle, atol=1e-6)
    ended = np.asarray(rollout.ended)
    penalized = oracle - config.ppo.missing_eos_penalty * (~ended)
    # GAE's return at the last response token is that token's reward (V = 0 after it):
    # the penalized oracle score minus β·k1 there.
    last = np.asarray(pm.last_token_index(rollout.mask))
    k1 = np.asarray(kl_lib.kl_k1(scored["log_probs"], scored["ref_log_probs"]))
    rows = np.arange(last.size)
    reward_last = np.asarray(exp.returns)[rows, last] + float(beta) * k1[rows, last]
    np.testing.assert_allclose(reward_last, penalized, atol=1e-5)
    assert metrics["reward"] == pytest.approx(penalized.mean(), abs=1e-5)
    assert metrics["oracle_score"] == pytest.approx(oracle.mean(), abs=1e-6)
    gain, bias = (float(parts.extras["calibration"][k]) for k in ("gain", "bias"))
    rm = gain * np.asarray(scored["raw_scores"]) + bias
    assert metrics["rm_score"] == pytest.approx(rm.mean(), abs=1e-5)


def test_oracle_reward_ppo_steps(random_runs, tmp_path):
    """ppo.reward=oracle on random runs with a graded oracle: the scoring step's last-token
    reward is the oracle's, and two iterations train with finite metrics."""
    workdir = tmp_path / "ppo"
    argv = [
        *ppo_stage_args("ppo.py", workdir, random_runs["root"] / "tfds"),
        f"--config.init_from={random_runs['sft']}",
        f"--config.reward_from={random_runs['reward']}",
        f"--config.data.path={random_runs['prompts']}",
        f"--config.task={TEST_TASK}",
        "--config.ppo.reward=oracle",
        "--config.ppo.max_new_tokens=6",
        "--config.ppo.epochs=1",
    ]
    _, config = parse_stage_args("ppo", argv)
    parts = ppo.build(config, workdir)
    parts.extras["calibration"] = json.loads((random_runs["reward"] / CALIBRATION_FILE).read_text())
    check_oracle_experience(parts, DigitShare(), config)
    state = parts.state
    for _ in range(2):
        state, metrics = parts.train_step(state, parts.to_device(next(parts.batches)))
        for key in ("reward", "rm_score", "oracle_score", "kl", "policy_loss", "value_loss"):
            assert math.isfinite(float(metrics[key])), key
        penalty = config.ppo.missing_eos_penalty * (1.0 - float(metrics["eos_rate"]))
        assert float(metrics["reward"]) == pytest.approx(
            float(metrics["oracle_score"]) - penalty, abs=1e-5
        )
    assert int(state.step) == 2


def run_eval(tmp_path: pathlib.Path, sft, reward, policies, prompts, task, *extra) -> dict:
    out = tmp_path / "results.json"
    argv = ["rlhf-eval", "--sft", str(sft), "--reward", str(reward), "--prompts", str(prompts)]
    argv += [f"--policy={p}" for p in policies]
    assert cli.main([*argv, "--task", task, "--out", str(out), *extra]) == 0
    return json.loads(out.read_text())


RESULT_KEYS = ("num_prompts", "n", "task", "seed", "temperature", "max_new_tokens", "policies")
ROW_KEYS = (
    "name",
    "oracle_score",
    "rm_score",
    "kl_to_sft",
    "rm_pairwise_accuracy",
    "rm_pairs",
    "response_length",
    "eos_rate",
)
BEST_KEYS = (
    "n",
    "rm_chosen_oracle_score",
    "oracle_chosen_oracle_score",
    "mean_oracle_score",
    "rm_chosen_rm_score",
    "kl",
)


def check_result(result: dict, n: int, prompts: int, names: list[str]) -> None:
    for key in RESULT_KEYS:
        assert key in result, key
    assert result["n"] == n and result["num_prompts"] == prompts
    assert [row["name"] for row in result["policies"]] == names
    for row in result["policies"]:
        for key in ROW_KEYS:
            assert key in row, key
        assert 0.0 <= row["oracle_score"] <= 1.0 and math.isfinite(row["rm_score"])
        assert row["rm_pairs"] == 0 or 0.0 <= row["rm_pairwise_accuracy"] <= 1.0
    assert result["policies"][0]["kl_to_sft"] == 0.0
    best = result["best_of_n"]
    for key in BEST_KEYS:
        assert key in best, key
    assert best["kl"] == pytest.approx(ev.best_of_n_kl(n))
    assert best["oracle_chosen_oracle_score"] >= best["rm_chosen_oracle_score"] - 1e-12
    assert best["oracle_chosen_oracle_score"] >= best["mean_oracle_score"] - 1e-12
    assert best["rm_chosen_rm_score"] >= result["policies"][0]["rm_score"] - 1e-9


def test_rlhf_eval_pulse(random_runs, tmp_path, capsys):
    r = random_runs
    result = run_eval(
        tmp_path,
        r["sft"],
        r["reward"],
        [r["policy"], r["sft"]],
        r["prompts"],
        TEST_TASK,
        "--n",
        "4",
        "--max-prompts",
        "8",
    )
    check_result(result, 4, 8, ["sft", "policy", "sft_2"])
    assert result["max_new_tokens"] == 6  # the calibration's budget: no PPO config here
    sft, policy, again = result["policies"]
    # Two different random networks: a clearly positive KL per response. The SFT policy
    # against itself: exactly 0, and the same samples (same key) score the same.
    assert policy["kl_to_sft"] > 0.1
    assert again["kl_to_sft"] == 0.0
    for key in ("oracle_score", "rm_score", "rm_pairwise_accuracy", "response_length"):
        assert again[key] == sft[key], key
    printed = capsys.readouterr().out
    assert "best-of-4" in printed and "policy" in printed


# ----------------------------------------------------------------------------- the trained chain


@pytest.mark.slow
def test_oracle_ppo_and_rlhf_eval_on_the_addition_chain(chain, tmp_path):  # noqa: F811
    """PPO with the oracle as reward on the trained tiny chain (Addition), then
    `flaxlm rlhf-eval` of SFT, that run and a reward-model PPO run (n = 16)."""
    runs = {}
    for reward in ("oracle", "model"):
        workdir = tmp_path / f"ppo_{reward}"
        argv = ppo_args(chain, workdir, f"--config.ppo.reward={reward}", "--config.total_steps=6")
        assert ppo.main(argv) == 0
        lines = [x for x in read_metrics(workdir) if "rm_score" in x]
        assert [x["step"] for x in lines] == list(range(1, 7))
        for line in lines:
            penalty = 1.0 - line["eos_rate"]  # ppo.missing_eos_penalty = 1
            source = line["oracle_score"] if reward == "oracle" else line["rm_score"]
            assert line["reward"] == pytest.approx(source - penalty, abs=1e-4), line
        runs[reward] = workdir
    _, config = parse_stage_args(
        "ppo", ppo_args(chain, tmp_path / "b", "--config.ppo.reward=oracle")
    )
    parts = ppo.build(config, tmp_path / "b")
    parts.extras["calibration"] = json.loads((chain["reward"] / CALIBRATION_FILE).read_text())
    # The tiny chain's SFT policy rarely answers right: its oracle scores may all be 0.
    check_oracle_experience(parts, tasks.Addition(), config, spread=False)
    result = run_eval(
        tmp_path,
        chain["sft"],
        chain["reward"],
        [runs["oracle"], runs["model"]],
        chain["paths"]["eval_prompts"],
        "addition",
        "--n",
        "16",
    )
    check_result(result, 16, 32, ["sft", "ppo_oracle", "ppo_model"])
    print(json.dumps(result, indent=1))
