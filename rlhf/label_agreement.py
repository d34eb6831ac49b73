"""Pairwise agreement between labelers, and with the oracle and the simulated labeler.

Between two rankings of the same K responses, the unit is a pair of responses
(K-choose-2 per prompt). A pair counts when at least one of the two rankings prefers one
response: same strict preference 1, opposite 0, a tie against a preference ½; pairs
both tie are left out. Against the oracle the pairs are those with different oracle
scores (`rlhf.labeler.pairwise_agreement`, a labeler tie ½), so a labeler's figure is
comparable with the simulated labeler's `expected_agreement` (75 % by default, about
the agreement between human labelers reported by Ouyang et al., 2022).

The simulated labeler ranks each prompt with a generator seeded by the candidate id,
so its column is reproducible.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np

from rlhf.label_store import LabelStore
from rlhf.labeler import Labeler, pairwise_agreement


def pair_agreement(a: Sequence[int], b: Sequence[int]) -> tuple[float, int]:
    """(agreeing pairs, counted pairs) between two rank lists of one prompt's responses."""
    if len(a) != len(b):
        raise ValueError(f"rankings of different lengths: {len(a)} and {len(b)}")
    agree, pairs = 0.0, 0
    for i, j in itertools.combinations(range(len(a)), 2):
        da, db = np.sign(a[j] - a[i]), np.sign(b[j] - b[i])
        if da == 0 and db == 0:
            continue
        pairs += 1
        agree += 1.0 if da == db else (0.5 if da == 0 or db == 0 else 0.0)
    return agree, pairs


def rankings_by_labeler(store: LabelStore) -> dict[str, dict[str, list[int]]]:
    """{labeler: {candidate id: ranking}} (skips left out)."""
    out: dict[str, dict[str, list[int]]] = {}
    for answer, _, _ in store.answers():
        if answer.ranking is not None:
            out.setdefault(answer.labeler or "(unnamed)", {})[answer.id] = answer.ranking
    return out


def _row(name: str, agree: float, pairs: int, prompts: int) -> dict[str, Any]:
    rate = agree / pairs if pairs else float("nan")
    return {"between": name, "agreement": rate, "pairs": pairs, "prompts": prompts}


def agreement_rows(
    store: LabelStore, task: Any = None, simulated: Labeler | None = None
) -> list[dict[str, Any]]:
    """One row per labeler pair on their common prompts, then (with a task) each labeler
    against the oracle and the simulated labeler, and the simulated labeler against the
    oracle on the prompts any human ranked."""
    ranks = rankings_by_labeler(store)
    rows = []
    for x, y in itertools.combinations(sorted(ranks), 2):
        common = sorted(set(ranks[x]) & set(ranks[y]))
        sums = [pair_agreement(ranks[x][c], ranks[y][c]) for c in common]
        agree, pairs = sum(s[0] for s in sums), sum(s[1] for s in sums)
        rows.append(_row(f"{x} vs {y}", agree, pairs, len(common)))
    if task is None:
        return rows
    simulated = simulated or Labeler()
    scores = {c.id: [float(task.score(c.prompt, r)) for r in c.responses] for c in store.candidates}
    sim = {}
    for cid in {c for per in ranks.values() for c in per}:
        rng = np.random.default_rng(int(cid, 16))
        sim[cid] = simulated.rank(scores[cid], rng)
    for x in sorted(ranks):
        o = [pairwise_agreement(scores[c], r) for c, r in ranks[x].items()]
        rows.append(_row(f"{x} vs oracle", sum(a for a, _ in o), sum(n for _, n in o), len(o)))
        s = [pair_agreement(r, sim[c]) for c, r in ranks[x].items()]
        rows.append(_row(f"{x} vs simulated", sum(a for a, _ in s), sum(n for _, n in s), len(s)))
    o = [pairwise_agreement(scores[c], r) for c, r in sim.items()]
    rows.append(_row("simulated vs oracle", sum(a for a, _ in o), sum(n for _, n in o), len(o)))
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no rankings to compare yet"
    width = max(len(r["between"]) for r in rows)
    return "\n".join(
        f"{r['between'].ljust(width)}  {r['agreement']:.3f}  over {r['pairs']} pairs "
        f"({r['prompts']} prompts)"
        for r in rows
    )
