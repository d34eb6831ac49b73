"""`flaxlm ppo` end to end on the Addition task: pretrain → SFT → reward → PPO (tiny runs
built once per module), the pulse (metrics, checkpoint, resume), a frozen reference, KL
pinned near 0 by a large β, and a seeded run that raises the reward-model score."""

from __future__ import annotations

import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import sharding as sh
from rlhf import kl as kl_lib
from rlhf import ppo
from rlhf import rollout as ro
from tests.rl_chain import stage_args
from train.metrics import read_metrics
from train.parent import load_params, read_parent
from train.stage import parse_stage_args
from train.state import abstract_sharded_params

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


@pytest.fixture(scope="module")
def chain(rl_chain) -> dict:
    return rl_chain  # tests/rl_chain.py, built once per session (tests/conftest.py)


def ppo_args(chain: dict, workdir: pathlib.Path, *extra: str) -> list:
    return stage_args(
        "ppo.py",
        workdir,
        chain["tfds"],
        f"--config.init_from={chain['sft']}",
        f"--config.reward_from={chain['reward']}",
        f"--config.data.path={chain['paths']['prompts']}",
        "--config.task=addition",
        *extra,
    )


METRICS = (
    "rm_score",
    "oracle_score",
    "kl",
    "kl_coef",
    "entropy",
    "policy_loss",
    "value_loss",
    "clip_fraction",
    "approx_kl",
    "ratio_mean",
    "ratio_var",
    "value_explained_variance",
    "response_length",
    "eos_rate",
    "log_prob_gap",
    "update_norm",
    "time_rollout",
    "time_scoring",
    "time_learning",
    "time_rollout_share",
)


def test_ppo_pulse_logs_metrics_and_resumes(chain, tmp_path):
    """Two iterations, then a resumed third: the adaptive β carried over in the checkpoint."""
    workdir = tmp_path / "ppo"
    adaptive = ("--config.kl.target=1.0", "--config.kl.horizon=64")
    held_out = (
        "--config.eval.every_steps=2",
        f"--config.eval.path={chain['paths']['eval_prompts']}",
    )
    argv = ppo_args(chain, workdir, "--config.total_steps=2", *adaptive, *held_out)
    assert ppo.main(argv) == 0
    evals = [x for x in read_metrics(workdir) if "eval_rm_score" in x]
    assert [x["step"] for x in evals] == [2]
    for key in ("eval_rm_score", "eval_oracle_score", "eval_kl", "eval_eos_rate"):
        assert math.isfinite(evals[0][key]), key
    lines = [x for x in read_metrics(workdir) if "rm_score" in x]
    assert [x["step"] for x in lines] == [1, 2]
    for key in METRICS:
        assert all(math.isfinite(x[key]) for x in lines), key
    for x in lines:
        whole = x["time_rollout"] + x["time_scoring"] + x["time_learning"]
        assert x["time_rollout_share"] == pytest.approx(x["time_rollout"] / whole, rel=1e-6)
    assert lines[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # π = π_ref before any update
    assert lines[0]["log_prob_gap"] <= 1e-3
    own = read_parent(workdir)
    assert own.stage == "ppo" and own.step == 2
    assert own.meta["lineage"]["reward_model"].startswith(str(chain["reward"]))
    assert ppo.main(ppo_args(chain, workdir, "--config.total_steps=3", *adaptive)) == 0
    lines = [x for x in read_metrics(workdir) if "rm_score" in x]
    assert [x["step"] for x in lines] == [1, 2, 3]
    beta = 0.05
    for line in lines:  # each iteration's β follows the controller from the previous one
        assert line["kl_coef"] == pytest.approx(beta, rel=1e-5)
        beta = kl_lib.adaptive_beta(beta, line["kl"], 1.0, 64, 16)


def test_bad_input_is_one_line(chain, tmp_path, capsys):
    workdir = tmp_path / "bad"
    code = ppo.main(ppo_args(chain, workdir, f"--config.reward_from={chain['sft']}"))
    assert code == 2
    err = capsys.readouterr().err
    assert "not a reward model" in err and len(err.strip().splitlines()) == 1, err
    assert not workdir.exists()


@pytest.fixture(scope="module")
def runs(chain, tmp_path_factory) -> dict:
    """One build; 10 seeded iterations at the preset's β and 10 at β = 1000 from the same
    SFT start, each policy then measured on the same 64 held-out prompts and key."""
    workdir = tmp_path_factory.mktemp("ppo_runs")
    _, config = parse_stage_args("ppo", ppo_args(chain, workdir))
    parts = ppo.build(config, workdir)
    with open(chain["paths"]["eval_prompts"], encoding="utf-8") as f:
        prompts = [json.loads(line)["prompt"] for line in f]
    rows = ro.encode_prompts(parts.tokenizer, (prompts * 2)[:64], config.seq_len)
    batch_sharding = sh.batch_sharding(parts.mesh, parts.rules)
    held_out = {k: jax.device_put(np.asarray(v), batch_sharding) for k, v in rows._asdict().items()}
    key = jax.random.key(123)
    start = parts.state
    out = {"parts": parts, "start": jax.device_get(start.params)}
    out["sft"] = parts.extras["evaluate"](start, held_out, key)
    for name, beta in (("ppo", config.kl.beta), ("beta_large", 1000.0)):
        state = jax.tree.map(jnp.copy, start).replace(kl_coef=jnp.float32(beta))
        logged = []
        for _ in range(10):
            state, metrics = parts.train_step(state, parts.to_device(next(parts.batches)))
            logged.append({k: float(v) for k, v in metrics.items()})
        out[name] = {"eval": parts.extras["evaluate"](state, held_out, key), "logged": logged}
        out[name]["params"] = jax.device_get(state.params)
    print(
        f"held-out RM score: SFT {out['sft']['rm_score']:.3f} -> PPO "
        f"{out['ppo']['eval']['rm_score']:.3f} (KL {out['ppo']['eval']['kl']:.3f}); "
        f"beta=1000: {out['beta_large']['eval']['rm_score']:.3f} "
        f"(KL {out['beta_large']['eval']['kl']:.3f})"
    )
    return out


def test_short_ppo_run_increases_the_reward_model_score(runs):
    sft_score, ppo_score = runs["sft"]["rm_score"], runs["ppo"]["eval"]["rm_score"]
    # Measured: 0.11 -> 1.70 (scores are calibrated to std 1 on SFT samples).
    assert ppo_score > sft_score + 0.5, (sft_score, ppo_score)
    logged = runs["ppo"]["logged"]
    assert np.mean([m["rm_score"] for m in logged[-3:]]) > np.mean(
        [m["rm_score"] for m in logged[:3]]
    )


def test_large_beta_keeps_kl_near_zero(runs):
    # Measured: 0.10 nats per response at beta=1000 vs 5.7 at the preset's 0.05.
    large, ppo_kl = runs["beta_large"]["eval"]["kl"], runs["ppo"]["eval"]["kl"]
    assert abs(large) < 0.3 and ppo_kl > 10 * abs(large), (large, ppo_kl)
    assert all(abs(m["kl"]) < 0.5 for m in runs["beta_large"]["logged"])


def test_reference_never_changes(chain, runs):
    parts = runs["parts"]
    sft_params = load_params(
        read_parent(chain["sft"]),
        abstract_sharded_params(parts.extras["models"]["policy"], parts.mesh, parts.rules),
    )
    ref = jax.device_get(parts.extras["frozen"]["ref"])
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(jax.device_get(sft_params)), strict=True):
        np.testing.assert_array_equal(a, b)
    for name in ("ppo", "beta_large"):  # while the policy did move
        new, old = jax.tree.leaves(runs[name]["params"]), jax.tree.leaves(runs["start"])
        moved = zip(new, old, strict=True)
        assert any(not np.array_equal(a, b) for a, b in moved)
