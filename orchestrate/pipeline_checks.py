"""Did each stage do its job? The pipeline report checks every finished stage against the
target a run on a preference task should meet and says in words why one fell short.

Targets:
- sft: its sampled oracle score (T=1, held-out prompts) within `SFT_TOLERANCE` of the
  teacher's: imitation is all SFT can do, so the teacher's level is its ceiling;
- reward: held-out pairwise accuracy against the oracle >= `RM_ACCURACY`;
- ppo, grpo, dpo: close >= `GAP_CLOSED` of the gap between SFT and the oracle's maximum
  (`task.max_score`, 1 for the tasks here) at a KL to SFT <= `KL_LIMIT` nats.

A policy stage that falls short gets the first reason that applies, in this order: KL
blow-up; no reward variance (GRPO: most groups scored all alike, so nothing to learn); a
reward model below its target (for DPO: its implicit reward, the log-ratio to SFT, ranks
the held-out pairs under `RM_ACCURACY`); reward hacking (the RM score rose, the oracle did
not); then, for the stages that read the reward model (PPO, GRPO), a reward model wrong on
the policy's own samples (pairwise accuracy under `DRIFT_ACCURACY` there), then settings
that hold the policy near SFT (PPO on the oracle itself, same settings, closed under
`GAP_CLOSED` too), then a KL to SFT under `NEAR_SFT_KL` (its own KL weight holds it
there); else how much of the gap it closed. ppo_oracle (PPO on the oracle
itself) is the upper reference, not checked. Each shortfall also names the settings to
change next (`TO_TRY`, the tuning recipe of docs/rlhf.md).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

SFT_TOLERANCE = 0.05
RM_ACCURACY = 0.85
GAP_CLOSED = 0.5
KL_LIMIT = 10.0
NOTHING_TO_CLOSE = 0.02  # SFT within this of the maximum: no gap worth measuring
# The reward model's accuracy on the policy's own samples under which it is the reason a
# stage fell short. Not RM_ACCURACY: those pairs are near misses, harder than SFT's, and
# 13 of the grid's 18 PPO stages that met their target were under 0.85 there (docs/rlhf.md).
DRIFT_ACCURACY = 0.7
# A policy short with nothing else wrong, under this many nats from SFT: its KL weight
# holds it there. At half the weight DPO closed more on 5 of 6 such runs, GRPO on 4 of 5
# and PPO on its one, runs from seeds outside the grid the rule was read from among them
# (docs/rlhf.md).
NEAR_SFT_KL = 0.5
NO_VARIANCE = 0.5  # GRPO: mean fraction of all-alike groups at or above this
TEACHER_SAMPLES = 8  # teacher answers per held-out prompt for its oracle level
EPS = 1e-9  # a figure at a target's boundary meets it, whatever its last bit


@dataclasses.dataclass(frozen=True)
class Check:
    stage: str
    target: str
    measured: str
    met: bool
    why: str = ""  # empty when met
    gap_closed: float | None = None  # policy stages: the fraction of the gap closed
    kind: str = ""  # the shortfall's key in TO_TRY and SHORT (empty when met)

    @property
    def to_try(self) -> str:
        """What the tuning recipe changes next (empty when met)."""
        return to_try(self.kind, self.stage) if self.kind else ""


# The tuning recipe (docs/rlhf.md, "Tuning recipe"): for each reason a check falls short,
# the settings to change first. `{stage}` is the policy stage's config section.
TO_TRY = {
    "sft": (
        "more demonstrations (data.n_sft) if SFT's eval loss rose while its train loss "
        "fell; else more steps (sft.total_steps, pretrain.total_steps)"
    ),
    "reward": (
        "the mean read (reward.reward.pool=mean) if its grad_norm fell to ~0.1 within the "
        "first steps; else more responses ranked per prompt (rm_data.k), or more ranked prompts "
        "at about one epoch: rm_data.num_prompts (<= data.n_prompts) with reward.total_steps = "
        "rm_data.num_prompts / reward.batch_size"
    ),
    "kl": "{first}a larger KL weight: {beta}",
    "variance": "larger groups (grpo.grpo.group_size), so some of each group differ",
    "weak_rm": "the reward model first (its row); PPO on the oracle shows what it leaves",
    "weak_dpo": (
        "more steps (dpo.total_steps) while its held-out pair accuracy rises; not once it "
        "is >= 0.85"
    ),
    "hacking": "{first}a larger KL weight ({beta}) or a stronger reward model",
    "drift": (
        "cleaner rankings (a labeler that agrees more with the oracle; simulated: "
        "labeler.random_rate); not a smaller KL weight ({beta}), which lets the policy "
        "exploit the reward model"
    ),
    "held": "a smaller KL weight ({beta}), then more steps ({stage}.total_steps)",
    "near_sft": "a smaller KL weight ({beta}), about half",
    "gap": "more steps ({stage}.total_steps) or a larger learning rate ({stage}.optim.lr)",
}
# Where a stage needs other advice than TO_TRY's for the same reason. DPO that learned its
# pairs and moved >= NEAR_SFT_KL without closing half the gap: on 6 such grid runs a KL
# weight halved or doubled, 3x the steps and cleaner rankings each left it no closer on
# average, while PPO from the same rankings closed more on 5 (docs/rlhf.md).
STAGE_TO_TRY = {
    ("gap", "dpo"): (
        "PPO from the same rankings (its row); DPO's KL weight ({beta}), steps and cleaner "
        "rankings took such runs no closer on average in the probes"
    ),
}
# Each shortfall in a few words, for tables over many runs (summary.json's
# `<stage>_shortfall` holds the key).
SHORT = {
    "sft": "SFT below the teacher",
    "reward": "RM below 0.85",
    "kl": "KL blow-up",
    "variance": "no reward variance",
    "weak_rm": "RM too weak",
    "weak_dpo": "DPO pairs not learned",
    "hacking": "reward hacking",
    "drift": "RM wrong on policy samples",
    "held": "PPO on the oracle short too",
    "near_sft": "held near SFT by its KL weight",
    "gap": "gap closed < 50%",
}
KL_WEIGHT = {"ppo": "ppo.kl.beta", "grpo": "grpo.kl.beta", "dpo": "dpo.dpo.beta"}
# Tried before a larger KL weight for a drifting stage: GRPO's std-scaled advantages turn a
# group of near-equal reward-model scores into full-size updates (docs/rlhf.md).
KL_FIRST = {
    "grpo": "advantages not divided by the group's std (grpo.grpo.scale_by_std=False) "
    "if they were; then "
}


def to_try(kind: str, stage: str = "") -> str:
    beta = KL_WEIGHT.get(stage, "the KL weight")
    text = STAGE_TO_TRY.get((kind, stage), TO_TRY[kind])
    return text.format(stage=stage, beta=beta, first=KL_FIRST.get(stage, ""))


def teacher_level(task: Any, prompts: Sequence[str], seed: int) -> float:
    """Mean oracle score of `TEACHER_SAMPLES` teacher answers per held-out prompt."""
    rng = np.random.default_rng(seed)
    scores = [
        task.score(p, task.demonstration(p, rng)) for p in prompts for _ in range(TEACHER_SAMPLES)
    ]
    return float(np.mean(scores))


def check_sft(sft_oracle: float, teacher: float) -> Check:
    target = f"oracle >= teacher {teacher:.3f} - {SFT_TOLERANCE}"
    measured = f"oracle {sft_oracle:.3f}"
    if sft_oracle >= teacher - SFT_TOLERANCE - EPS:
        return Check("sft", target, measured, True)
    why = f"below the teacher by {teacher - sft_oracle:.3f}: SFT has not learned the demonstrations"
    return Check("sft", target, measured, False, why, kind="sft")


def check_reward(accuracy: float) -> Check:
    target = f"held-out pairwise accuracy >= {RM_ACCURACY}"
    measured = f"accuracy {accuracy:.3f}"
    if accuracy >= RM_ACCURACY - EPS:
        return Check("reward", target, measured, True)
    return Check("reward", target, measured, False, "reward model too weak", kind="reward")


@dataclasses.dataclass(frozen=True)
class PolicyFigures:
    """What the policy check reads: held-out figures of the policy and of SFT."""

    oracle: float
    kl: float | None
    sft_oracle: float
    rm_score: float | None = None
    sft_rm_score: float | None = None
    rm_accuracy: float | None = None  # the reward model's held-out accuracy (PPO, GRPO)
    zero_std_groups: float | None = None  # GRPO: mean fraction of all-alike groups
    # DPO: its implicit reward's accuracy on the held-out pairs (the last eval)
    implicit_accuracy: float | None = None
    # The reward model's accuracy against the oracle on the policy's own samples (PPO, GRPO)
    rm_accuracy_on_policy: float | None = None
    # The gap closed by PPO on the oracle itself, same settings (PPO, GRPO)
    reference_closed: float | None = None


def gap_closed(oracle: float, sft_oracle: float, max_score: float) -> float | None:
    """(policy - SFT) / (maximum - SFT); None when SFT is already at the maximum."""
    gap = max_score - sft_oracle
    return None if gap <= NOTHING_TO_CLOSE else (oracle - sft_oracle) / gap


def check_policy(stage: str, f: PolicyFigures, max_score: float = 1.0) -> Check:
    target = f"closes >= {GAP_CLOSED:.0%} of the gap to {max_score:g} at KL <= {KL_LIMIT:g}"
    closed = gap_closed(f.oracle, f.sft_oracle, max_score)
    kl_text = "–" if f.kl is None else f"{f.kl:.2f}"
    if closed is None:
        measured = f"SFT already at {f.sft_oracle:.3f}; oracle {f.oracle:.3f}, KL {kl_text}"
        return Check(stage, target, measured, True)
    measured = f"closed {closed:.0%} (oracle {f.sft_oracle:.3f} -> {f.oracle:.3f}), KL {kl_text}"
    kl_ok = f.kl is None or f.kl <= KL_LIMIT
    if closed >= GAP_CLOSED - EPS and kl_ok:
        return Check(stage, target, measured, True, gap_closed=closed)
    kind, why = shortfall(closed, f)
    return Check(stage, target, measured, False, why, closed, kind)


def shortfall(closed: float, f: PolicyFigures) -> tuple[str, str]:
    """Why a policy stage missed its target, the first reason that applies: (its key in
    `TO_TRY`, the reason in words)."""
    if f.kl is not None and f.kl > KL_LIMIT:
        return "kl", f"KL blow-up: {f.kl:.1f} nats to SFT (limit {KL_LIMIT:g})"
    if f.zero_std_groups is not None and f.zero_std_groups >= NO_VARIANCE:
        return "variance", (
            f"no reward variance: {f.zero_std_groups:.0%} of groups scored all alike, "
            "so they carried no signal"
        )
    if f.rm_accuracy is not None and f.rm_accuracy < RM_ACCURACY:
        return "weak_rm", (
            f"reward model too weak (held-out accuracy {f.rm_accuracy:.3f} < {RM_ACCURACY})"
        )
    if f.implicit_accuracy is not None and f.implicit_accuracy < RM_ACCURACY:
        return "weak_dpo", (
            f"DPO has not learned the pairs: its implicit reward ranks the held-out pairs "
            f"at {f.implicit_accuracy:.3f} (< {RM_ACCURACY})"
        )
    if f.rm_score is not None and f.sft_rm_score is not None:
        rm_gain, oracle_gain = f.rm_score - f.sft_rm_score, f.oracle - f.sft_oracle
        if rm_gain > 0 and oracle_gain <= 0:
            return "hacking", (
                f"reward hacking: RM score +{rm_gain:.3f} over SFT while the oracle "
                f"moved {oracle_gain:+.3f}"
            )
    if f.rm_accuracy_on_policy is not None and f.rm_accuracy_on_policy < DRIFT_ACCURACY:
        return "drift", (
            "the reward model is wrong on the policy's own samples: pairwise accuracy "
            f"{f.rm_accuracy_on_policy:.3f} against the oracle (< {DRIFT_ACCURACY})"
        )
    if f.reference_closed is not None and f.reference_closed < GAP_CLOSED:
        return "held", (
            f"PPO on the oracle itself closed only {f.reference_closed:.0%} at these settings: "
            "the KL weight and steps, not the reward model, hold the policy near SFT"
        )
    if f.kl is not None and f.kl < NEAR_SFT_KL:
        return "near_sft", (
            f"held near SFT: it moved only {f.kl:.2f} nats from it (< {NEAR_SFT_KL}) with "
            "nothing else wrong, so its KL weight holds it there"
        )
    return "gap", f"closed {closed:.0%} of the gap, under the {GAP_CLOSED:.0%} target"


def mean_of(rows: Sequence[Mapping[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if key in r]
    return float(np.mean(values)) if values else None


def last_of(rows: Sequence[Mapping[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if key in r]
    return values[-1] if values else None


def run_checks(
    policies: Mapping[str, Mapping[str, Any]],
    metrics: Mapping[str, Sequence[Mapping[str, Any]]],
    teacher: float | None,
    max_score: float = 1.0,
) -> list[Check]:
    """A check per finished stage with the figures it needs. `policies`: the report's
    held-out figures per policy; `metrics`: each stage's metrics.jsonl rows."""
    checks = []
    sft = policies.get("sft")
    if sft is not None and teacher is not None:
        checks.append(check_sft(sft["oracle_sampled"], teacher))
    rm_accuracy = last_of(metrics.get("reward", []), "eval_pair_accuracy")
    if rm_accuracy is not None:
        checks.append(check_reward(rm_accuracy))
    reference = policies.get("ppo_oracle")  # PPO on the oracle itself, same settings
    reference_closed = None
    if reference is not None and sft is not None:
        reference_closed = gap_closed(reference["oracle_sampled"], sft["oracle_sampled"], max_score)
    for stage in ("ppo", "grpo", "dpo"):
        if stage not in policies or sft is None:
            continue
        p = policies[stage]
        reads_rm = stage != "dpo"  # DPO reads no reward model
        rows = metrics.get(stage, [])
        figures = PolicyFigures(
            oracle=p["oracle_sampled"],
            kl=p.get("kl_to_sft"),
            sft_oracle=sft["oracle_sampled"],
            rm_score=p.get("heldout_rm_score"),
            sft_rm_score=sft.get("heldout_rm_score"),
            rm_accuracy=rm_accuracy if reads_rm else None,
            zero_std_groups=mean_of(rows, "zero_std_groups"),
            rm_accuracy_on_policy=p.get("rm_accuracy") if reads_rm else None,
            implicit_accuracy=None if reads_rm else last_of(rows, "eval_reward_accuracy"),
            reference_closed=reference_closed if reads_rm else None,
        )
        checks.append(check_policy(stage, figures, max_score))
    return checks


def checks_section(checks: Sequence[Check]) -> list[str]:
    """Markdown: a row per checked stage, and a line naming those that fell short."""
    if not checks:
        return []
    lines = ["", "## Stage checks", ""]
    lines += ["| stage | target | measured | met | why not | try next |"]
    lines += ["|---|---|---|---|---|---|"]
    for c in checks:
        met = "yes" if c.met else "no"
        lines.append(f"| {c.stage} | {c.target} | {c.measured} | {met} | {c.why} | {c.to_try} |")
    short = [c.stage for c in checks if not c.met]
    lines += ["", f"Fell short: {', '.join(short)}." if short else "Every checked stage met it."]
    return lines


def checks_summary(checks: Sequence[Check]) -> dict[str, float | str]:
    """summary.json keys: `<stage>_target_met` (1.0 or 0.0), for policy stages with a gap
    to close `<stage>_gap_closed`, and for a stage that fell short `<stage>_shortfall`
    (why, as a key of `SHORT`)."""
    out = {f"{c.stage}_target_met": float(c.met) for c in checks}
    out |= {f"{c.stage}_gap_closed": c.gap_closed for c in checks if c.gap_closed is not None}
    return out | {f"{c.stage}_shortfall": c.kind for c in checks if not c.met}
