"""Reward-model data the InstructGPT way: K responses sampled from the SFT policy for each
prompt, rank-ordered by a (simulated) labeler.

`sample_groups` draws the K responses of every prompt with rlhf/rollout.py (K copies of
each prompt row, one jitted sampler, batches of `batch_size` rows); `ranked_records`
ranks each group with rlhf/labeler.py. The training file is ranked by the noisy labeler;
the held-out file by the noiseless oracle (`Labeler(random_rate=0)`), so the reward
model's held-out accuracy is its agreement with the oracle on the SFT policy's own
samples. Groups whose K responses all tie carry no comparison and are dropped (counted).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from model import sharding as sh
from model.generate import SamplingConfig
from rlhf import rollout as ro
from rlhf.labeler import Labeler, pairwise_agreement, ranked_record
from rlhf.tasks import PreferenceTask
from train.sft import to_host
from train.stage import StageError


def sample_groups(
    model: Any,
    params: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    k: int,
    key: jax.Array,
    *,
    prompt_len: int,
    max_new_tokens: int,
    sampling: SamplingConfig,
    batch_size: int,
    mesh: jax.sharding.Mesh,
    rules: sh.Rules,
    desc: str = "sampling",
) -> list[list[str]]:
    """K decoded responses per prompt -> [len(prompts)][K].

    Rows are prompt-major (prompt i's samples are rows i·K … i·K + K - 1); batch b uses
    fold_in(key, b), so the result depends on the key and batch size only. The last
    batch is padded with copies of its last row (decoded and dropped). Each batch keeps
    only the prompt columns its longest prompt needs (`ro.trim_prompts`).
    """
    rows = [p for p in prompts for _ in range(k)]
    multiple = mesh.shape["data"] * mesh.shape["fsdp"]
    batch_size = -(-batch_size // multiple) * multiple
    texts: list[str] = []
    for b, start in enumerate(tqdm(range(0, len(rows), batch_size), desc=desc, unit=" batch")):
        chunk = rows[start : start + batch_size]
        padded = chunk + [chunk[-1]] * (batch_size - len(chunk))
        try:
            encoded = ro.trim_prompts(ro.encode_prompts(tokenizer, padded, prompt_len))
        except ValueError as err:
            raise StageError(f"rm_data: {err} (raise the ppo seq_len)") from None
        with sh.sharding_context(mesh, rules):
            rollout = ro.sample(
                model,
                params,
                encoded,
                jax.random.fold_in(key, b),
                max_new_tokens=max_new_tokens,
                sampling=sampling,
                mesh=mesh,
                rules=rules,
                stop_id=tokenizer.end_of_turn_id,
                pad_id=tokenizer.pad_id,
            )
        host = rollout._replace(tokens=to_host(rollout.tokens), mask=to_host(rollout.mask))
        texts += ro.decode_responses(tokenizer, host)[: len(chunk)]
    return [texts[i * k : (i + 1) * k] for i in range(len(prompts))]


def ranked_records(
    task: PreferenceTask,
    prompts: Sequence[str],
    groups: Sequence[Sequence[str]],
    labeler: Labeler,
    rng: np.random.Generator,
    allow_empty: bool = False,
) -> tuple[list[dict], dict[str, float]]:
    """Ranked JSONL records for each prompt's group, and a summary: groups kept and dropped
    (all tied), the labeler's measured pairwise agreement with the oracle, the groups'
    mean oracle score. No group left is an error unless `allow_empty`."""
    records, agree, pairs, scores = [], 0.0, 0, []
    for prompt, responses in zip(prompts, groups, strict=True):
        record = ranked_record(task, prompt, responses, rng, labeler)
        group_scores = [float(task.score(prompt, r)) for r in responses]
        scores += group_scores
        if record is None:
            continue
        records.append(record)
        a, n = pairwise_agreement(group_scores, record["ranking"])
        agree, pairs = agree + a, pairs + n
    if not records and not allow_empty:
        raise StageError(
            f"rm_data: all {len(prompts)} groups tie under the labeler (no comparison to "
            "learn from): the policy's samples are too poor or too alike; train it longer "
            "or raise rm_data.temperature"
        )
    summary = {
        "groups": len(records),
        "dropped_all_tied": len(prompts) - len(records),
        "labeler_agreement": agree / pairs if pairs else float("nan"),
        "pairs": pairs,
        "mean_oracle_score": float(np.mean(scores)) if scores else float("nan"),
    }
    return records, summary
