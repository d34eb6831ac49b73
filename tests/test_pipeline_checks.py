"""The report's stage checks (orchestrate/pipeline_checks.py) on hand-made figures: each
target at its boundary, and each reason a policy stage falls short."""

import dataclasses
import re

import numpy as np
import pytest

from orchestrate import pipeline_checks as pc


class ReverseTask:
    """Teacher: reverses prompts that start with "a", echoes the rest. Oracle: 1 for the
    reversed prompt, else 0. So the teacher's level on ["ab", "ba", "aa"] is 2/3 by hand
    ("ab" -> "ba" right, "ba" -> "ba" wrong, "aa" -> "aa" right)."""

    def demonstration(self, prompt, rng):
        assert isinstance(rng, np.random.Generator)
        return prompt[::-1] if prompt.startswith("a") else prompt

    def score(self, prompt, response):
        return float(response == prompt[::-1])


def test_teacher_level_is_the_mean_oracle_score_of_teacher_answers():
    assert pc.teacher_level(ReverseTask(), ["ab", "ba", "aa"], seed=0) == pytest.approx(2 / 3)


def test_sft_meets_its_target_within_the_tolerance_of_the_teacher():
    assert pc.check_sft(0.56, teacher=0.6).met
    short = pc.check_sft(0.54, teacher=0.6)
    assert not short.met and "below the teacher by 0.060" in short.why


def test_reward_model_target_is_085_held_out_accuracy():
    assert pc.check_reward(0.85).met
    short = pc.check_reward(0.84)
    assert not short.met and short.why == "reward model too weak"


def figures(**kw):
    return pc.PolicyFigures(**({"oracle": 0.7, "kl": 2.0, "sft_oracle": 0.4} | kw))


def test_half_the_gap_to_the_maximum_meets_the_policy_target():
    met = pc.check_policy("ppo", figures(oracle=0.7))  # (0.7 - 0.4) / (1 - 0.4) = 0.5
    assert met.met and met.gap_closed == pytest.approx(0.5)
    short = pc.check_policy("ppo", figures(oracle=0.67))  # 0.45
    assert not short.met and short.gap_closed == pytest.approx(0.45)
    assert short.why == "closed 45% of the gap, under the 50% target"
    # A task whose oracle tops out at 2: the gap is 1.6, and 0.3 of it is 19 %.
    assert pc.check_policy("ppo", figures(), max_score=2.0).gap_closed == pytest.approx(0.3 / 1.6)


def test_kl_blow_up_fails_even_a_stage_that_closed_the_gap():
    short = pc.check_policy("ppo", figures(oracle=0.95, kl=12.5))
    assert not short.met and short.why.startswith("KL blow-up: 12.5 nats")
    assert pc.check_policy("ppo", figures(oracle=0.95, kl=10.0)).met


def test_each_reason_in_its_order():
    no_variance = figures(oracle=0.5, zero_std_groups=0.8, rm_accuracy=0.6)
    assert pc.shortfall(0.1, no_variance)[1].startswith("no reward variance: 80% of groups")
    weak = figures(oracle=0.5, zero_std_groups=0.2, rm_accuracy=0.6)
    assert pc.shortfall(0.1, weak)[1].startswith("reward model too weak (held-out accuracy 0.600")
    hacked = figures(oracle=0.38, rm_accuracy=0.9, rm_score=0.9, sft_rm_score=0.5)
    assert pc.shortfall(-0.03, hacked)[1] == (
        "reward hacking: RM score +0.400 over SFT while the oracle moved -0.020"
    )
    honest = figures(oracle=0.45, rm_accuracy=0.9, rm_score=0.6, sft_rm_score=0.5)
    assert pc.shortfall(0.08, honest)[1] == "closed 8% of the gap, under the 50% target"
    misled = dataclasses.replace(honest, rm_accuracy_on_policy=0.6, reference_closed=0.3)
    assert pc.shortfall(0.08, misled) == (
        "drift",
        "the reward model is wrong on the policy's own samples: pairwise accuracy 0.600 "
        "against the oracle (< 0.7)",
    )
    held = dataclasses.replace(misled, rm_accuracy_on_policy=0.7)
    assert pc.shortfall(0.08, held) == (
        "held",
        "PPO on the oracle itself closed only 30% at these settings: the KL weight and "
        "steps, not the reward model, hold the policy near SFT",
    )
    # PPO on the oracle closed half the gap: the settings can; the policy did not.
    assert pc.shortfall(0.08, dataclasses.replace(held, reference_closed=0.5))[0] == "gap"
    unlearned = figures(oracle=0.45, implicit_accuracy=0.48, rm_score=0.6, sft_rm_score=0.5)
    assert pc.shortfall(0.08, unlearned) == (
        "weak_dpo",
        "DPO has not learned the pairs: its implicit reward ranks the held-out pairs at "
        "0.480 (< 0.85)",
    )
    learned = dataclasses.replace(unlearned, implicit_accuracy=0.85, kl=0.5)
    assert pc.shortfall(0.08, learned)[0] == "gap"
    # Pairs learned, but under half a nat from SFT: the KL weight held DPO there.
    assert pc.shortfall(0.08, dataclasses.replace(learned, kl=0.49)) == (
        "near_sft",
        "held near SFT: it moved only 0.49 nats from it (< 0.5) with nothing else wrong, "
        "so its KL weight holds it there",
    )
    # The last reason before "gap": every other one comes first.
    assert pc.shortfall(0.08, dataclasses.replace(honest, kl=0.1))[0] == "near_sft"
    near = dataclasses.replace(held, kl=0.1)
    assert pc.shortfall(0.08, near)[0] == "held"
    assert pc.shortfall(0.08, dataclasses.replace(near, reference_closed=0.5))[0] == "near_sft"
    assert pc.shortfall(0.08, dataclasses.replace(unlearned, kl=0.1))[0] == "weak_dpo"
    assert pc.shortfall(0.08, dataclasses.replace(hacked, kl=0.1))[0] == "hacking"


def test_sft_at_the_maximum_leaves_nothing_to_close():
    check = pc.check_policy("grpo", figures(sft_oracle=0.99, oracle=0.97))
    assert check.met and check.gap_closed is None and "SFT already at 0.990" in check.measured


def test_run_checks_reads_the_report_figures_and_stage_metrics():
    policies = {
        "sft": {"oracle_sampled": 0.4, "heldout_rm_score": 0.1},
        "ppo": {"oracle_sampled": 0.45, "kl_to_sft": 1.0, "heldout_rm_score": 0.3},
        "ppo_oracle": {"oracle_sampled": 0.52, "kl_to_sft": 1.0},  # closed 20 %
        "grpo": {"oracle_sampled": 0.41, "kl_to_sft": 0.5, "heldout_rm_score": 0.1},
        "dpo": {"oracle_sampled": 0.42, "kl_to_sft": 0.5, "rm_accuracy": 0.5},
    }
    metrics = {
        "reward": [
            {"step": 10, "eval_pair_accuracy": 0.9},
            {"step": 20, "eval_pair_accuracy": 0.7},
        ],
        "grpo": [{"zero_std_groups": 1.0}, {"zero_std_groups": 0.5}, {"loss": 0.0}],
    }
    checks = {c.stage: c for c in pc.run_checks(policies, metrics, teacher=0.5)}
    assert list(checks) == ["sft", "reward", "ppo", "grpo", "dpo"]
    assert not checks["sft"].met  # 0.4 < 0.5 - 0.05
    assert not checks["reward"].met  # the last eval line: 0.7
    assert checks["ppo"].why.startswith("reward model too weak (held-out accuracy 0.700")
    assert checks["grpo"].why.startswith("no reward variance: 75% of groups")  # mean of 1, 0.5
    assert checks["dpo"].why == "closed 3% of the gap, under the 50% target"  # no RM reason
    assert pc.checks_summary(checks.values()) == {
        "sft_target_met": 0.0,
        "reward_target_met": 0.0,
        "ppo_target_met": 0.0,
        "grpo_target_met": 0.0,
        "dpo_target_met": 0.0,
        "ppo_gap_closed": pytest.approx(0.05 / 0.6),
        "grpo_gap_closed": pytest.approx(0.01 / 0.6),
        "dpo_gap_closed": pytest.approx(0.02 / 0.6),
        "sft_shortfall": "sft",
        "reward_shortfall": "reward",
        "ppo_shortfall": "weak_rm",
        "grpo_shortfall": "variance",
        "dpo_shortfall": "gap",
    }
    assert all(c.kind in pc.SHORT and c.kind in pc.TO_TRY for c in checks.values())
    lines = pc.checks_section(list(checks.values()))
    assert lines[-1] == "Fell short: sft, reward, ppo, grpo, dpo."
    assert sum(line.startswith("| ") for line in lines) == 1 + 5  # header and one row each


def test_run_checks_reads_ppo_on_the_oracle_and_the_rm_on_policy_samples():
    policies = {
        "sft": {"oracle_sampled": 0.4},
        "ppo": {"oracle_sampled": 0.5, "kl_to_sft": 1.0, "rm_accuracy": 0.8},
        "ppo_oracle": {"oracle_sampled": 0.64, "kl_to_sft": 1.0},  # closed 40 %
        "grpo": {"oracle_sampled": 0.5, "kl_to_sft": 1.0, "rm_accuracy": 0.6},
        "dpo": {"oracle_sampled": 0.5, "kl_to_sft": 1.0, "rm_accuracy": 0.6},
    }
    metrics = {"reward": [{"eval_pair_accuracy": 0.9}]}
    checks = {c.stage: c for c in pc.run_checks(policies, metrics, teacher=None)}
    # DPO reads no reward model and has no reference: "gap".
    assert (checks["ppo"].kind, checks["grpo"].kind, checks["dpo"].kind) == ("held", "drift", "gap")
    assert checks["ppo"].why.startswith("PPO on the oracle itself closed only 40%")
    assert (
        checks["ppo"].to_try
        == "a smaller KL weight (ppo.kl.beta), then more steps (ppo.total_steps)"
    )
    assert checks["grpo"].to_try.startswith("cleaner rankings")
    assert "labeler.random_rate" in checks["grpo"].to_try
    assert "not a smaller KL weight (grpo.kl.beta)" in checks["grpo"].to_try
    # With PPO on the oracle at 70 %, the settings are not what held PPO back.
    policies["ppo_oracle"]["oracle_sampled"] = 0.82
    assert pc.run_checks(policies, metrics, teacher=None)[1].kind == "gap"
    # DPO's own held-out pair accuracy, the last eval line of its metrics.
    metrics["dpo"] = [{"eval_reward_accuracy": 0.9}, {"loss": 0.3}, {"eval_reward_accuracy": 0.6}]
    dpo = pc.run_checks(policies, metrics, teacher=None)[-1]
    assert dpo.kind == "weak_dpo" and "at 0.600" in dpo.why and "dpo.total_steps" in dpo.to_try
    # DPO's pairs learned, the RM right on PPO's and GRPO's samples, each under half a nat
    # from SFT (their KL to SFT from the report): held near SFT.
    metrics["dpo"].append({"eval_reward_accuracy": 0.9})
    for stage in ("ppo", "grpo", "dpo"):
        policies[stage] |= {"kl_to_sft": 0.3, "rm_accuracy": 0.8}
    checks = {c.stage: c for c in pc.run_checks(policies, metrics, teacher=None)}
    assert [checks[s].kind for s in ("ppo", "grpo", "dpo")] == ["near_sft"] * 3
    assert checks["dpo"].to_try == "a smaller KL weight (dpo.dpo.beta), about half"
    assert checks["grpo"].to_try == "a smaller KL weight (grpo.kl.beta), about half"


def test_no_teacher_and_no_reward_eval_means_no_such_checks():
    policies = {"sft": {"oracle_sampled": 0.5}, "ppo": {"oracle_sampled": 0.8, "kl_to_sft": 1.0}}
    checks = pc.run_checks(policies, {}, teacher=None)
    assert [(c.stage, c.met) for c in checks] == [("ppo", True)]
    assert pc.checks_section(checks)[-1] == "Every checked stage met it."
    assert pc.checks_section([]) == []


def test_each_shortfall_names_what_to_change_next():
    kl = pc.check_policy("dpo", figures(oracle=0.95, kl=12.5))
    assert kl.to_try == "a larger KL weight: dpo.dpo.beta"
    gap = pc.check_policy("grpo", figures(oracle=0.45))
    assert "grpo.total_steps" in gap.to_try and "grpo.optim.lr" in gap.to_try
    # DPO short with nothing else wrong: the probes found no DPO setting; PPO's row.
    dpo_gap = pc.check_policy("dpo", figures(oracle=0.45, implicit_accuracy=0.9))
    assert dpo_gap.kind == "gap" and dpo_gap.to_try.startswith("PPO from the same rankings")
    assert "dpo.optim.lr" not in dpo_gap.to_try and "(dpo.dpo.beta)" in dpo_gap.to_try
    no_variance = pc.check_policy("grpo", figures(oracle=0.5, zero_std_groups=0.8))
    assert "grpo.grpo.group_size" in no_variance.to_try
    weak = pc.check_policy("ppo", figures(oracle=0.5, rm_accuracy=0.6))
    assert weak.to_try.startswith("the reward model first")
    hacked = pc.check_policy("ppo", figures(oracle=0.38, rm_score=0.9, sft_rm_score=0.5))
    assert "ppo.kl.beta" in hacked.to_try and "scale_by_std" not in hacked.to_try
    grpo_kl = pc.check_policy("grpo", figures(oracle=0.95, kl=12.5)).to_try
    assert grpo_kl.startswith("advantages not divided by the group's std")
    assert grpo_kl.endswith("then a larger KL weight: grpo.kl.beta")
    assert "rm_data.k" in pc.check_reward(0.7).to_try
    assert "rm_data.num_prompts" in pc.check_reward(0.7).to_try
    assert "data.n_sft" in pc.check_sft(0.3, teacher=0.6).to_try
    met = [pc.check_sft(0.6, 0.6), pc.check_reward(0.9), pc.check_policy("ppo", figures())]
    assert [c.to_try for c in met] == ["", "", ""]
    assert [c.kind for c in met] == ["", "", ""]
    assert "ppo_shortfall" not in pc.checks_summary(met)
    assert (kl.kind, gap.kind, no_variance.kind, weak.kind, hacked.kind) == (
        "kl",
        "gap",
        "variance",
        "weak_rm",
        "hacking",
    )
    row = pc.checks_section([kl])[5]  # after a blank, the title, a blank, header, rule
    assert row.endswith(
        "| KL blow-up: 12.5 nats to SFT (limit 10) | a larger KL weight: dpo.dpo.beta |"
    )


@pytest.mark.parametrize("stage", ["ppo", "grpo", "dpo"])
def test_every_setting_the_recipe_names_is_a_pipeline_key(stage):
    from configs import pipeline as pipeline_config
    from orchestrate.pipeline_sizing import get_key

    demo = pipeline_config.get_config("demo")
    named = {
        k
        for kind in pc.TO_TRY
        for k in re.findall(r"\b[a-z_]+(?:\.[a-z_]+)+", pc.to_try(kind, stage))
    }
    assert {"data.n_sft", "reward.total_steps", f"{stage}.total_steps"} <= named
    for key in named:
        assert get_key(demo, key) is not None, key
