"""Keys the RL stages (PPO, GRPO, DPO) share, built once on top of `base_config()`.

Every RL stage has `task` (a hidden oracle, rlhf/tasks.py), `sampling.*` (temperature,
top_k, top_p) for the responses it samples, a constant learning rate without weight
decay, and a section named after the stage holding `max_new_tokens` (the response
budget). The stages that sample and score rollouts while they train (PPO, GRPO:
`rollouts=True`) also share `reward_from`, `health.*` (rlhf/health.py) and the rollout keys
of their section: `reward` (model | oracle), `epochs`, `minibatches`, `clip_eps`,
`missing_eos_penalty` and `log_prob_atol`. A stage file adds its own keys (its `kl`
section included: PPO's adaptive k1 controller and GRPO's fixed k3 β share no default)
and overrides the shared defaults it does not keep.

Presets: `tiny` (seconds on a laptop) and `default` (accelerators); the parts every RL
stage sets alike are set here, the rest in the stage files.
"""

from __future__ import annotations

import ml_collections

from configs.base import base_config

PRESETS = ("tiny", "default")

# decode_impl "cpu": each rollout decode step as one CPU kernel call (model/fused_decode.py;
# fp32 Llama-style policies on one device).
SAMPLING = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "decode_impl": "xla"}
# Rollout health checks (rlhf/health.py): warn or stop when W = window iterations in a
# row show a run that cannot learn.
HEALTH = {"enabled": True, "window": 5}
RESPONSE = {"max_new_tokens": 16}
ROLLOUT = {
    "reward": "model",  # model | oracle: what scores a response
    "epochs": 1,
    "minibatches": 1,
    "clip_eps": 0.2,
    "missing_eos_penalty": 1.0,
    "log_prob_atol": 1e-3,  # the sampler/learner health check (fp32; loosen for bf16)
}


def check_preset(arg: str | None) -> str:
    """The preset `arg` names (None: tiny); ValueError naming the choices otherwise."""
    preset = arg or "tiny"
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {PRESETS}")
    return preset


def rl_base_config(stage: str, arg: str | None, *, rollouts: bool) -> ml_collections.ConfigDict:
    """`base_config()` with the keys every RL stage shares, for preset `arg`.

    `stage` names the stage and its section (`c.<stage>`); `rollouts` adds what the stages
    that sample rollouts while training share (see the module docstring)."""
    preset = check_preset(arg)
    c = base_config()
    c.stage = stage
    if rollouts:
        c.reward_from = ""  # a `flaxlm reward` workdir or checkpoint
    # Optional hidden oracle (rlhf/tasks.py): its score in the metrics; with rollouts also
    # the reward when <stage>.reward=oracle.
    c.task = ""
    c.sampling = ml_collections.ConfigDict(SAMPLING)
    c[stage] = ml_collections.ConfigDict(RESPONSE | (ROLLOUT if rollouts else {}))
    if rollouts:
        c.health = ml_collections.ConfigDict(HEALTH)
    c.optim.schedule, c.optim.weight_decay = "constant", 0.0
    _preset(c, c[stage], preset, rollouts)
    return c


def _preset(
    c: ml_collections.ConfigDict, section: ml_collections.ConfigDict, preset: str, rollouts: bool
) -> None:
    """What `tiny` and `default` set alike for every RL stage."""
    if preset == "tiny":
        section.max_new_tokens = 8
        c.optim.warmup_steps = 0
        c.log.every_steps = 1
        return
    section.max_new_tokens = 256
    c.mesh.data, c.mesh.fsdp = 1, -1
    if rollouts:
        # One iteration is a whole rollout: log each; checkpoint every 100.
        c.log.every_steps, c.checkpoint.every_steps = 1, 100
        section.log_prob_atol = 5e-2  # bf16 compute: cached decode and full forward round apart
