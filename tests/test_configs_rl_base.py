"""The RL stage configs (PPO, GRPO, DPO) take their shared sections from one builder,
configs/rl_base.py: these fail when a stage file redefines a shared key with its own value,
or when a stage's own keys leak into the shared part."""

from __future__ import annotations

import importlib
from typing import Any

import pytest

from configs import rl_base
from configs.base import base_config

ROLLOUT_STAGES = ("ppo", "grpo")
STAGES = (*ROLLOUT_STAGES, "dpo")
# Shared keys a stage deliberately sets to its own value (PPO's 4 epochs over 2 minibatches;
# GRPO's tiny preset takes 2 of each so the test exercises the shuffled minibatch path).
OVERRIDDEN = {"ppo": {"ppo.epochs", "ppo.minibatches"}, "grpo": {"grpo.epochs", "grpo.minibatches"}}
# Each stage's own section keys (beyond rl_base's RESPONSE and, with rollouts, ROLLOUT).
OWN_KEYS = {
    "ppo": {"value_clip_eps", "vf_coef", "ent_coef", "gamma", "lam", "whiten_advantages"}
    | {"value_lr"},
    "grpo": {"group_size", "scale_by_std"},
    "dpo": {"beta", "label_smoothing", "max_responses", "ref_batch_size"},
}


def flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out |= flat(value, f"{prefix}{key}.")
        else:
            out[prefix + key] = value
    return out


def stage_config(stage: str, preset: str) -> dict[str, Any]:
    return flat(importlib.import_module(f"configs.{stage}").get_config(preset).to_dict())


def builder_config(stage: str, preset: str) -> dict[str, Any]:
    rollouts = stage in ROLLOUT_STAGES
    return flat(rl_base.rl_base_config(stage, preset, rollouts=rollouts).to_dict())


@pytest.mark.parametrize("preset", rl_base.PRESETS)
@pytest.mark.parametrize("stage", STAGES)
def test_stage_keeps_the_builders_shared_keys(stage, preset):
    built, base = builder_config(stage, preset), flat(base_config().to_dict())
    shared = {k for k, v in built.items() if k not in base or base[k] != v}
    assert {"stage", "task", "sampling.temperature", "optim.schedule"} <= shared
    got = stage_config(stage, preset)
    drifted = {
        k: (got.get(k), built[k])
        for k in shared - OVERRIDDEN.get(stage, set())
        if got.get(k) != built[k]
    }
    assert not drifted, f"{stage}:{preset} redefines shared keys (got, rl_base): {drifted}"


@pytest.mark.parametrize("preset", rl_base.PRESETS)
def test_shared_sections_are_the_same_in_every_rl_stage(preset):
    configs = {s: importlib.import_module(f"configs.{s}").get_config(preset) for s in STAGES}
    for stage, c in configs.items():
        assert c.sampling.to_dict() == rl_base.SAMPLING, stage
        assert (c.optim.schedule, c.optim.weight_decay) == ("constant", 0.0), stage
        assert c[stage].max_new_tokens == configs["ppo"].ppo.max_new_tokens, stage
    for stage in ROLLOUT_STAGES:
        c = configs[stage]
        assert c.health.to_dict() == rl_base.HEALTH, stage
        assert c.reward_from == "" and c.task == "", stage
        shared = set(rl_base.ROLLOUT) - {"epochs", "minibatches"}
        assert {k: c[stage][k] for k in shared} == {k: configs["ppo"].ppo[k] for k in shared}
    # DPO trains on fixed pairs: no rollout keys, reward model, health checks or kl section.
    dpo = configs["dpo"]
    assert not {"reward_from", "health", "kl"} & set(dpo.keys())
    assert not set(rl_base.ROLLOUT) & set(dpo.dpo.keys())


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_section_holds_its_own_keys(stage):
    section = set(importlib.import_module(f"configs.{stage}").get_config("tiny")[stage].keys())
    shared = set(rl_base.RESPONSE) | (set(rl_base.ROLLOUT) if stage in ROLLOUT_STAGES else set())
    assert section - shared == OWN_KEYS[stage]
    assert shared <= section


def test_kl_sections_stay_stage_specific():
    ppo = importlib.import_module("configs.ppo").get_config("tiny")
    grpo = importlib.import_module("configs.grpo").get_config("tiny")
    assert set(ppo.kl.keys()) == {"beta", "target", "horizon", "estimator"}
    assert set(grpo.kl.keys()) == {"beta"}  # k3 per token, fixed β


@pytest.mark.parametrize("stage", STAGES)
def test_presets_and_bad_preset(stage):
    module = importlib.import_module(f"configs.{stage}")
    assert module.PRESETS == rl_base.PRESETS
    assert module.get_config(None).to_dict() == module.get_config("tiny").to_dict()
    with pytest.raises(ValueError, match=r"unknown preset 'huge'.*tiny"):
        module.get_config("huge")
