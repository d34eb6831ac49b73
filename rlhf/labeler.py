"""A simulated labeler: ranks K responses by the task's oracle, with noise; JSONL writers.

Noise model (decision). Human labelers agree with each other about 73-77% of the time
on pairwise preferences (Ouyang et al., 2022, appendix; Stiennon et al., 2020). We want
that agreement with the oracle to be a setting, independent of K and of how far apart
the oracle scores are, so the simulated labeler is *inattentive*: for each prompt, with
probability `random_rate` it returns a uniformly random order of the K responses (no
ties), otherwise it ranks them by oracle score, optionally perturbed by Gaussian noise
of std `score_noise` (a Thurstone labeler, who confuses close scores more often).
On a pair with different oracle scores and `score_noise` = 0 the labeler agrees with
the oracle with probability exactly 1 - random_rate/2, so the default random_rate = 0.5
gives 75%. Pairs the oracle ties are left tied by an attentive labeler (no preference
pair in the ranked data) and are not counted in the agreement.

Formats (train/data/records.py):
- ranked: {"prompt": str, "responses": [str] (K >= 2), "ranking": [int] (K)}, ranking[k]
  the dense rank of responses[k], 0 = best, equal = tie; groups where every response
  ties carry no pair and are not written (the reader would reject them);
- sft: {"prompt": str, "response": str} from the task's teacher;
- prompts: {"prompt": str} (the RL stages' prompts);
- pretraining text: documents separated by one blank line (read with doc_mode
  "blank_line"; the tasks' documents have no blank lines inside).

`write_task_data` writes the files a run starts from. Held-out prompts are drawn first
and kept out of the SFT and RL prompt files (the pretraining corpus draws its own, so
it may contain them, answered by the teacher — never by the oracle).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Sequence

import numpy as np

from rlhf.tasks import PreferenceTask


@dataclasses.dataclass(frozen=True)
class Labeler:
    """How the simulated labeler errs (see the module docstring)."""

    random_rate: float = 0.5
    score_noise: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.random_rate <= 1.0:
            raise ValueError(f"labeler.random_rate={self.random_rate}: must be in [0, 1]")
        if self.score_noise < 0.0:
            raise ValueError(f"labeler.score_noise={self.score_noise}: must be >= 0")

    @property
    def expected_agreement(self) -> float:
        """Pairwise agreement with the oracle on untied pairs, when score_noise is 0."""
        return 1.0 - self.random_rate / 2.0

    def rank(self, scores: Sequence[float], rng: np.random.Generator) -> list[int]:
        """Oracle scores [K] -> dense ranks [K] (0 = best, equal = tie)."""
        scores = np.asarray(scores, np.float64)
        if scores.ndim != 1 or scores.size < 2:
            raise ValueError(f"labeler: need K >= 2 scores, got shape {scores.shape}")
        if rng.random() < self.random_rate:
            return [int(r) for r in rng.permutation(scores.size)]
        if self.score_noise:
            scores = scores + rng.normal(0.0, self.score_noise, scores.size)
        return dense_ranks(scores)


def dense_ranks(scores: Sequence[float]) -> list[int]:
    """Scores [K] -> dense ranks, 0 for the highest score, equal scores equal ranks."""
    distinct = sorted(set(float(s) for s in scores), reverse=True)
    position = {s: i for i, s in enumerate(distinct)}
    return [position[float(s)] for s in scores]


def pairwise_agreement(scores: Sequence[float], ranks: Sequence[int]) -> tuple[float, int]:
    """(agreeing pairs, pairs) over the pairs with different oracle scores.

    A pair agrees when the labeler ranks the higher-scored response strictly better; a
    labeler tie on such a pair counts ½.
    """
    agree, pairs = 0.0, 0
    for i in range(len(scores)):
        for j in range(i + 1, len(scores)):
            if scores[i] == scores[j]:
                continue
            pairs += 1
            better, worse = (i, j) if scores[i] > scores[j] else (j, i)
            if ranks[better] < ranks[worse]:
                agree += 1.0
            elif ranks[better] == ranks[worse]:
                agree += 0.5
    return agree, pairs


def ranked_record(
    task: PreferenceTask,
    prompt: str,
    responses: Sequence[str],
    rng: np.random.Generator,
    labeler: Labeler = Labeler(),
) -> dict | None:
    """One ranked JSONL record for K responses to `prompt`, or None if all tie."""
    scores = [float(task.score(prompt, r)) for r in responses]
    ranks = labeler.rank(scores, rng)
    if max(ranks) == 0:
        return None
    return {"prompt": prompt, "responses": list(responses), "ranking": ranks}


def sft_records(task: PreferenceTask, rng: np.random.Generator, n: int) -> list[dict]:
    """n {"prompt", "response"} records: fresh prompts with one teacher answer each."""
    return [{"prompt": p, "response": task.demonstration(p, rng)} for p in task.prompts(rng, n)]


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> int:
    """Write one JSON object per line (UTF-8, no ASCII escaping); returns the count."""
    count = 0
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    return count


def _fresh_prompts(
    task: PreferenceTask, rng: np.random.Generator, n: int, exclude: set[str]
) -> list[str]:
    """n prompts not in `exclude` (repeats among them allowed, as the task draws them)."""
    out: list[str] = []
    for _ in range(1000):
        out += [p for p in task.prompts(rng, n - len(out)) if p not in exclude]
        if len(out) >= n:
            return out
    raise ValueError(f"could not draw {n} prompts outside the {len(exclude)} held out")


def write_task_data(
    task: PreferenceTask,
    directory: str | os.PathLike,
    rng: np.random.Generator,
    n_docs: int,
    n_sft: int,
    n_prompts: int,
    n_eval: int,
) -> dict[str, str]:
    """Write pretrain.txt, sft.jsonl, sft_eval.jsonl, prompts.jsonl, eval_prompts.jsonl.

    Returns {name without extension: path}. Eval prompts (n_eval distinct ones) are drawn
    first; sft_eval.jsonl answers them with the teacher.
    """
    os.makedirs(directory, exist_ok=True)
    paths = {
        name: os.path.join(os.fspath(directory), name + ext)
        for name, ext in (
            ("pretrain", ".txt"),
            ("sft", ".jsonl"),
            ("sft_eval", ".jsonl"),
            ("prompts", ".jsonl"),
            ("eval_prompts", ".jsonl"),
        )
    }
    held_out = list(dict.fromkeys(_fresh_prompts(task, rng, 4 * n_eval, set())))[:n_eval]
    if len(held_out) < n_eval:
        raise ValueError(f"the task has fewer than n_eval={n_eval} distinct prompts")
    excluded = set(held_out)
    with open(paths["pretrain"], "w", encoding="utf-8") as f:
        f.write("\n\n".join(task.pretraining_corpus(rng, n_docs)) + "\n")
    sft = _fresh_prompts(task, rng, n_sft, excluded)
    write_jsonl(paths["sft"], ({"prompt": p, "response": task.demonstration(p, rng)} for p in sft))
    write_jsonl(
        paths["sft_eval"],
        ({"prompt": p, "response": task.demonstration(p, rng)} for p in held_out),
    )
    write_jsonl(
        paths["prompts"], ({"prompt": p} for p in _fresh_prompts(task, rng, n_prompts, excluded))
    )
    write_jsonl(paths["eval_prompts"], ({"prompt": p} for p in held_out))
    return paths
