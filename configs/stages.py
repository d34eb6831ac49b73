"""Every stage, listed once: what runs it, what its checkpoint is, what it may start from,
and where it sits in `flaxlm pipeline`.

Two sorts of entry share the table:
- training stages (`module` set): `flaxlm NAME` and configs/NAME.py, a module with
  `build(config, workdir)` and `main(argv)`. `ppo_oracle` is the pipeline's PPO run on the
  task's oracle reward (the upper bound the report compares with): it runs rlhf/ppo.py on
  the `ppo` section and has no command of its own;
- the pipeline's own steps around them (data, tokenizer, rm_data, report).

Plain data: the table names modules and imports none, so every layer (train, rlhf,
orchestrate, configs) reads it without pointing upward.
"""

from __future__ import annotations

import dataclasses

# What a checkpoint counts as. An imported checkpoint is a language model and, when its
# tokenizer has a chat template (every chat stage checks that first), a chat policy.
LM, POLICY, REWARD = "language model", "chat policy", "reward model"


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    module: str = ""  # a training stage's module; "" for the pipeline's own steps
    help: str = ""  # the `flaxlm NAME` line; "" for a stage without a command
    sections: tuple[str, ...] = ()  # pipeline config sections it runs on (first) and reads
    needs: tuple[str, ...] = ()  # pipeline stages whose outputs it reads
    makes: tuple[str, ...] = ()  # what its checkpoint counts as (LM, POLICY, REWARD)
    starts_from: tuple[str, ...] = ()  # what its init_from may be

    @property
    def section(self) -> str:
        return (self.sections or (self.name,))[0]


STAGES = (
    Stage("data", needs=()),
    Stage("tokenizer", needs=("data",)),
    Stage(
        "pretrain",
        "train.pretrain",
        "pretrain a model on next-token prediction",
        needs=("data", "tokenizer"),
        makes=(LM,),
    ),
    Stage(
        "sft",
        "train.sft",
        "supervised fine-tuning on conversations (loss on responses)",
        needs=("pretrain",),
        makes=(LM, POLICY),
        starts_from=(LM,),
    ),
    Stage("rm_data", sections=("rm_data", "labeler"), needs=("sft",)),
    Stage(
        "reward",
        "train.reward",
        "train a reward model on ranked responses (K-wise loss)",
        needs=("rm_data",),
        makes=(REWARD,),
        starts_from=(LM, REWARD),
    ),
    Stage(
        "ppo",
        "rlhf.ppo",
        "RLHF with PPO against a reward model, KL to the SFT policy",
        needs=("reward",),
        makes=(LM, POLICY),
        starts_from=(POLICY,),
    ),
    Stage(
        "ppo_oracle",
        "rlhf.ppo",
        sections=("ppo",),
        needs=("reward",),
        makes=(LM, POLICY),
        starts_from=(POLICY,),
    ),
    Stage(
        "dpo",
        "rlhf.dpo",
        "DPO on ranked preference pairs, frozen SFT reference",
        needs=("rm_data",),
        makes=(LM, POLICY),
        starts_from=(POLICY,),
    ),
    Stage(
        "grpo",
        "rlhf.grpo",
        "RLHF with GRPO: G samples per prompt, group-relative advantages",
        needs=("reward",),
        makes=(LM, POLICY),
        starts_from=(POLICY,),
    ),
    Stage("report", needs=("sft",)),
)
BY_NAME = {s.name: s for s in STAGES}
# Checkpoints written by a command that is not a stage: imported models.
IMPORTED = {"import-hf": (LM, POLICY), "import-gguf": (LM, POLICY)}

PIPELINE_ORDER = tuple(s.name for s in STAGES)  # the order `flaxlm pipeline` runs them in
TRAINING = tuple(s.name for s in STAGES if s.module)  # run through train/stage.py
COMMANDS = tuple(s.name for s in STAGES if s.help)  # `flaxlm NAME`, configs/NAME.py
POLICIES = tuple(s.name for s in STAGES if POLICY in s.makes)  # the report's rows


def writers(kind: str) -> tuple[str, ...]:
    """The stages (as a checkpoint's meta records them) whose checkpoints count as `kind`:
    training commands first, then imports."""
    made = {s: BY_NAME[s].makes for s in COMMANDS} | IMPORTED
    return tuple(name for name, kinds in made.items() if kind in kinds)


def start_kind(stage: str) -> tuple[str, tuple[str, ...]]:
    """(in words, the stages it may start from) for a stage's `init_from`."""
    kinds = BY_NAME[stage].starts_from
    allowed = tuple(dict.fromkeys(w for kind in kinds for w in writers(kind)))
    return "a " + " or ".join(kinds), allowed
