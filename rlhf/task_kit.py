"""What every preference task module shares: argument checks and the teacher-written
pretraining corpus. The task modules import this; it imports none of them."""

from __future__ import annotations

from typing import Any

import numpy as np


def check_p_correct(p_correct: float) -> None:
    if not 0.0 <= p_correct <= 1.0:
        raise ValueError(f"p_correct={p_correct}: must be in [0, 1]")


def teacher_corpus(
    task: Any, rng: np.random.Generator, n_docs: int, lines: int, sep: str
) -> list[str]:
    """Documents of `lines` teacher-solved problems, one "prompt<sep>answer" per line."""
    docs = []
    for _ in range(n_docs):
        rows = [f"{p}{sep}{task.demonstration(p, rng)}" for p in task.prompts(rng, lines)]
        docs.append("\n".join(rows))
    return docs
