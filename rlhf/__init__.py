"""flaxlm RLHF: rollouts, PPO, DPO, GRPO and preference tasks (built on model/ and train/)."""
