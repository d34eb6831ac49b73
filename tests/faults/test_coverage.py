"""What the suite does not try, recorded so docs/reliability.md says so."""

from __future__ import annotations

from tests.faults import harness

GAPS = [
    (
        "all",
        "multi-host faults",
        "one host dying mid-step, or hosts disagreeing on a signal: "
        "needs several machines (tests/test_multihost.py covers agreement on loopback)",
    ),
    ("all", "real ENOSPC", "a real full filesystem (tmpfs) needs root; RLIMIT_FSIZE stands in"),
    (
        "sft, reward, ppo, dpo, grpo",
        "checkpoint damage",
        "tried on pretrain only: every stage "
        "restores through the same Checkpointer.restore (train/stage.py)",
    ),
]


def test_record_what_is_not_covered():
    for command, fault, why in GAPS:
        harness.record("coverage", command, fault, "-", "not tried", why, "-")
