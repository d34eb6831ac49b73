"""`flaxlm grpo` on the Addition task: a seeded in-process run (the uninterrupted
reference) against the CLI stopped at step 2 and resumed, a frozen reference, a run that
raises the reward-model score, the oracle reward, one-line errors. The pretrain → SFT →
reward chain is tests/test_dpo.py's, built once per session."""

from __future__ import annotations

import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from orchestrate import cli
from rlhf import grpo
from tests.rl_chain import stage_args
from tests.test_dpo import comparable
from train.metrics import read_metrics
from train.parent import load_params, read_parent
from train.stage import parse_stage_args
from train.state import abstract_sharded_params

STEPS = 10  # the in-process run; the CLI run stops at 2 and 4 of the same config
METRICS = (
    "rm_score",
    "oracle_score",
    "reward",
    "kl",
    "entropy",
    "group_std",
    "zero_std_groups",
    "loss",
    "grad_norm",
    "clip_fraction",
    "kl_k3",
    "response_kl_k3",
    "response_length",
    "eos_rate",
    "log_prob_gap",
    "update_norm",
    "time_rollout",
    "time_scoring",
    "time_learning",
    "time_rollout_share",
)


@pytest.fixture(scope="module")
def chain(rl_chain) -> dict:
    return rl_chain  # tests/rl_chain.py, built once per session (tests/conftest.py)


def grpo_args(chain: dict, workdir: pathlib.Path, *extra: str) -> list:
    return stage_args(
        "grpo.py",
        workdir,
        chain["tfds"],
        f"--config.init_from={chain['sft']}",
        f"--config.reward_from={chain['reward']}",
        f"--config.data.path={chain['paths']['prompts']}",
        f"--config.eval.path={chain['paths']['eval_prompts']}",
        "--config.task=addition",
        f"--config.total_steps={STEPS}",
        "--config.log.peak_flops_per_device=1e12",  # skip measuring the CPU
        *extra,
    )


@pytest.fixture(scope="module")
def runs(chain, tmp_path_factory) -> dict:
    """One build; STEPS seeded iterations straight; held-out eval of the SFT start and the
    result on the same prompts and key (eval.batch_size of them)."""
    workdir = tmp_path_factory.mktemp("grpo_runs")
    # Eval settings only measure: the steps are those of the CLI run without them.
    _, config = parse_stage_args("grpo", grpo_args(chain, workdir, "--config.eval.every_steps=4"))
    parts = grpo.build(config, workdir)
    evaluate = lambda params: parts.eval_fn(parts.state.replace(params=params))  # noqa: E731
    start = parts.state
    out = {"parts": parts, "start": jax.device_get(start.params), "sft": evaluate(start.params)}
    state, logged = jax.tree.map(jnp.copy, start), []
    for _ in range(STEPS):
        state, metrics = parts.train_step(state, parts.to_device(next(parts.batches)))
        logged.append({k: float(v) for k, v in metrics.items()})
    out |= {"logged": logged, "grpo": evaluate(state.params)}
    out["params"] = jax.device_get(state.params)
    print(
        f"held-out RM score: SFT {out['sft']['eval_rm_score']:.3f} -> GRPO "
        f"{out['grpo']['eval_rm_score']:.3f} (KL {out['grpo']['eval_kl']:.3f}); oracle "
        f"{out['sft']['eval_oracle_score']:.3f} -> {out['grpo']['eval_oracle_score']:.3f}"
    )
    return out


def test_grpo_pulse_resumes_exactly(chain, runs, tmp_path):
    """The CLI stopped at step 2 and resumed to 4 logs what the straight run computed."""
    workdir = tmp_path / "grpo"
    assert cli.main(["grpo", *grpo_args(chain, workdir, "--config.stop_at_step=2")]) == 0
    assert read_parent(workdir).step == 2
    assert grpo.main(grpo_args(chain, workdir, "--config.stop_at_step=4")) == 0
    lines = read_metrics(workdir)
    train = [x for x in lines if "rm_score" in x]
    assert [x["step"] for x in train] == [1, 2, 3, 4]
    for key in METRICS:
        assert all(math.isfinite(x[key]) for x in train), key
    straight = [{"step": i + 1, **m} for i, m in enumerate(runs["logged"][:4])]
    assert comparable(train) == comparable(straight)
    assert train[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # π = π_ref before any update
    assert train[0]["log_prob_gap"] <= 1e-3
    for key in ("eval_rm_score", "eval_oracle_score", "eval_kl", "eval_eos_rate"):
        assert math.isfinite(runs["sft"][key]) and math.isfinite(runs["grpo"][key]), key
    assert (workdir / "config.json").is_file()
    own = read_parent(workdir)
    assert own.stage == "grpo" and own.step == 4
    assert own.meta["lineage"]["reward_model"].startswith(str(chain["reward"]))


def test_reference_never_changes(chain, runs):
    parts = runs["parts"]
    sft_params = load_params(
        read_parent(chain["sft"]),
        abstract_sharded_params(parts.extras["models"]["policy"], parts.mesh, parts.rules),
    )
    ref = jax.device_get(parts.extras["frozen"]["ref"])
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(jax.device_get(sft_params)), strict=True):
        np.testing.assert_array_equal(a, b)
    moved = zip(jax.tree.leaves(runs["params"]), jax.tree.leaves(runs["start"]), strict=True)
    assert any(not np.array_equal(a, b) for a, b in moved)  # while the policy did move


def test_short_grpo_run_increases_the_reward_model_score(runs):
    # Measured: 0.05 -> 1.48 (KL 2.7 nats); the oracle barely moves, 0.016 -> 0.026 (with
    # grpo.reward=oracle instead: 0.016 -> 0.099, rm_score 1.26): the RM is the bottleneck.
    sft_score, grpo_score = runs["sft"]["eval_rm_score"], runs["grpo"]["eval_rm_score"]
    assert grpo_score > sft_score + 0.3, (sft_score, grpo_score)
    logged = runs["logged"]
    assert np.mean([m["rm_score"] for m in logged[-3:]]) > np.mean(
        [m["rm_score"] for m in logged[:3]]
    )


@pytest.mark.slow  # one more build and compilation (~20 s of CPU)
def test_oracle_reward_runs_without_a_reward_model(chain, tmp_path):
    workdir = tmp_path / "oracle"
    argv = grpo_args(
        chain,
        workdir,
        "--config.reward_from=",
        "--config.grpo.reward=oracle",
        "--config.total_steps=1",
    )
    assert grpo.main(argv) == 0
    (line,) = read_metrics(workdir)
    assert "rm_score" not in line and math.isfinite(line["oracle_score"])
    # The score learned from is the oracle's minus the eos penalty.
    assert line["reward"] <= line["oracle_score"] + 1e-6


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (("--config.grpo.group_size=1",), "grpo.group_size"),
        (("--config.grpo.reward=oracle", "--config.task="), "grpo.reward=oracle needs task"),
        (("--config.grpo.reward=critic",), "grpo.reward"),
        (("REWARD",), "init_from"),
    ],
)
def test_bad_input_is_one_line(chain, tmp_path, capsys, overrides, needle):
    workdir = tmp_path / "bad"
    if overrides == ("REWARD",):
        overrides = (f"--config.init_from={chain['reward']}",)
    assert grpo.main(grpo_args(chain, workdir, *overrides)) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err
    assert not workdir.exists()
