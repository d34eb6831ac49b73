"""Held-out RLHF measurements: policy samples, oracle and reward-model scores, KL to the
SFT policy, best-of-n, and the reward model's pairwise accuracy against the oracle.

Everything runs on held-out prompts with a fixed key, so two policies (SFT, PPO, DPO,
GRPO) are compared on the same prompts and the same random stream. `flaxlm rlhf-eval`
(rlhf/evaluate_cli.py) assembles these into the table the pipeline report uses.

Samples are prompt-major: n responses per prompt, row i·n + j of the flat batch is
sample j of prompt i; per-prompt arrays are [P, n]. The sampling distribution is
log_softmax(limit_vocab(logits) / T), as in PPO (rlhf/rollout.py), and the KL is between
these tempered distributions, so at the PPO temperature it is the KL PPO penalizes.
Reward-model scores are read as PPO reads them (rlhf/ppo_learner.py `reward_scores`, the
scalar head over the sampled response pooled as the reward model was trained), then
calibrated (gain·raw + bias, train/reward.py).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from model import sharding as sh
from model.generate import Prompts, SamplingConfig
from model.tokenizer import AnyTokenizer
from model.transformer import Transformer
from rlhf import kl as kl_lib
from rlhf import labeler as lab
from rlhf import ppo_learner as pl
from rlhf import rollout as ro
from train.sft import batch_multiple, to_host

Params = Any


@dataclasses.dataclass(frozen=True)
class Samples:
    """n sampled responses per prompt, with the rollouts they came from.

    rollouts: fixed-size chunks of the prompt-major rows (one compilation); the last is
    padded with copies of the final row, which every reader drops (`rows` are real).
    """

    prompts: list[str]  # [P] user turns
    responses: list[list[str]]  # [P][n] decoded, without the end-of-turn marker
    rollouts: list[ro.Rollout]
    n: int

    @property
    def rows(self) -> int:
        return len(self.prompts) * self.n


def _flat(samples: Samples, per_chunk: list[np.ndarray]) -> np.ndarray:
    """Per-chunk host arrays [chunk, ...] -> the real rows [P, n, ...]."""
    flat = np.concatenate(per_chunk)[: samples.rows]
    return flat.reshape(len(samples.prompts), samples.n, *flat.shape[1:])


def policy_samples(
    model: Transformer,
    params: Params,
    tokenizer: AnyTokenizer,
    prompts: Sequence[str],
    n: int,
    key: jax.Array,
    *,
    prompt_len: int,
    max_new_tokens: int,
    sampling: SamplingConfig,
    mesh: jax.sharding.Mesh,
    rules: sh.Rules,
    batch_size: int = 256,
) -> Samples:
    """Sample n responses for each user-turn prompt -> `Samples` (decoded on the host).

    Prompts go through the chat template left padded to `prompt_len` tokens
    (rlhf/rollout.py `encode_prompts`). Rows are sampled `batch_size` at a time (rounded
    up to the mesh's batch split); chunk c uses fold_in(key, c), so a fixed key gives the
    same samples for the same params, prompts, n and batch_size.
    """
    if n < 1 or not prompts:
        raise ValueError(f"policy_samples: need n >= 1 and prompts (n={n}, {len(prompts)})")
    prompts = list(prompts)
    rows = [p for p in prompts for _ in range(n)]
    multiple = batch_multiple(mesh, rules)
    chunk = -(-min(batch_size, len(rows)) // multiple) * multiple
    rows += [rows[-1]] * (-len(rows) % chunk)
    encoded = ro.encode_prompts(tokenizer, rows, prompt_len)
    sharding = sh.batch_sharding(mesh, rules)
    rollouts, texts = [], []
    for c, start in enumerate(range(0, len(rows), chunk)):
        part = Prompts(
            *(jax.device_put(np.asarray(a[start : start + chunk]), sharding) for a in encoded)
        )
        rollout = ro.sample(
            model,
            params,
            part,
            jax.random.fold_in(key, c),
            max_new_tokens=max_new_tokens,
            sampling=sampling,
            mesh=mesh,
            rules=rules,
            stop_id=tokenizer.end_of_turn_id,
            pad_id=tokenizer.pad_id,
        )
        host = rollout._replace(tokens=to_host(rollout.tokens), mask=to_host(rollout.mask))
        texts += ro.decode_responses(tokenizer, host)
        rollouts.append(rollout)
    responses = [texts[i * n : (i + 1) * n] for i in range(len(prompts))]
    return Samples(prompts, responses, rollouts, n)


def oracle_scores(
    task: Any, prompts: Sequence[str], responses: Sequence[Sequence[str]]
) -> np.ndarray:
    """The task's hidden oracle on every response: prompts [P], responses [P][n] -> [P, n]."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} response groups")
    pairs = zip(prompts, responses, strict=True)
    return np.asarray([[float(task.score(p, r)) for r in group] for p, group in pairs], np.float64)


def rm_scores(
    model: Transformer,
    params: Params,
    calibration: dict,
    samples: Samples,
    mesh: jax.sharding.Mesh,
    rules: sh.Rules,
) -> np.ndarray:
    """Calibrated reward-model scores gain·raw + bias of every sample -> [P, n]."""
    with sh.sharding_context(mesh, rules):
        pool = calibration["pool"]
        raw = [to_host(_reward_scores(model, params, r, pool)) for r in samples.rollouts]
    return float(calibration["gain"]) * _flat(samples, raw).astype(np.float64) + float(
        calibration["bias"]
    )


def sequence_kl(
    model: Transformer,
    params: Params,
    ref_model: Transformer,
    ref_params: Params,
    samples: Samples,
    sampling: SamplingConfig,
    mesh: jax.sharding.Mesh,
    rules: sh.Rules,
) -> float:
    """Mean KL(π ‖ π_ref) per response, nats: k1 = log π - log π_ref summed over each
    response's tokens (rlhf/kl.py), averaged over the policy's own samples (a Monte-Carlo
    estimate: unbiased, each term may be negative). `samples` must come from π.

    Both log-probs are recomputed in one forward pass each (rlhf/rollout.py
    `learner_log_probs`, the sampling temperature), so π = π_ref gives exactly 0.
    """
    with sh.sharding_context(mesh, rules):
        kls = [
            to_host(_sequence_kl_rows(model, ref_model, sampling, params, ref_params, r))
            for r in samples.rollouts
        ]
    return float(np.mean(_flat(samples, kls)))


# Module-level jits keyed on the (hashable) models: one compilation per model and shape
# however many policies are evaluated.
@functools.partial(jax.jit, static_argnums=(0, 3))
def _reward_scores(model: Transformer, params: Params, rollout: ro.Rollout, pool: str) -> jax.Array:
    return pl.reward_scores(model, params, rollout, pool)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _sequence_kl_rows(
    model: Transformer,
    ref_model: Transformer,
    sampling: SamplingConfig,
    params: Params,
    ref_params: Params,
    rollout: ro.Rollout,
) -> jax.Array:
    """k1 summed over each response of the rollout, [B]."""
    lp = ro.learner_log_probs(model, params, rollout, sampling)
    ref = ro.learner_log_probs(ref_model, ref_params, rollout, sampling)
    return kl_lib.sequence_kl(kl_lib.kl_k1(lp, ref), rollout.mask)


def response_stats(samples: Samples) -> dict[str, float]:
    """Mean response length (tokens, end-of-turn included) and the rate of ended ones."""
    lengths = [to_host(r.mask).sum(-1) for r in samples.rollouts]
    ended = [to_host(r.ended) for r in samples.rollouts]
    return {
        "response_length": float(np.mean(_flat(samples, lengths))),
        "eos_rate": float(np.mean(_flat(samples, ended))),
    }


# ----------------------------------------------------------------------------- pure statistics


def rm_pairwise_accuracy(rm: np.ndarray, oracle: np.ndarray) -> dict[str, float | int | None]:
    """How often the reward model orders two responses to one prompt as the NOISELESS
    oracle does. rm, oracle: [P, n] scores grouped per prompt.

    Counted over every within-prompt pair whose oracle scores differ (oracle ties, e.g.
    two identical responses, carry no preference and are excluded); a reward-model tie
    on such a pair counts ½ (rlhf/labeler.py `pairwise_agreement`). Returns {"accuracy"
    (None when there is no pair), "pairs"}.
    """
    rm, oracle = np.asarray(rm, np.float64), np.asarray(oracle, np.float64)
    if rm.shape != oracle.shape or rm.ndim != 2:
        raise ValueError(f"rm {rm.shape} and oracle {oracle.shape} scores must both be [P, n]")
    agree, pairs = 0.0, 0
    for rm_row, oracle_row in zip(rm, oracle, strict=True):
        a, k = lab.pairwise_agreement(oracle_row.tolist(), lab.dense_ranks(rm_row.tolist()))
        agree, pairs = agree + a, pairs + k
    return {"accuracy": agree / pairs if pairs else None, "pairs": pairs}


def best_of_n_kl(n: int) -> float:
    """KL(best-of-n ‖ base) = log n - (n - 1)/n nats (Stiennon et al., 2020, appendix).

    Exact for a continuous score with no ties among the n samples; with ties or repeated
    responses it is an upper bound (Beirami et al., 2024).
    """
    if n < 1:
        raise ValueError(f"best-of-n: n={n} must be >= 1")
    return math.log(n) - (n - 1) / n


def best_of_n(rm: np.ndarray, oracle: np.ndarray) -> dict[str, Any]:
    """Best-of-n on [P, n] scores of n samples per prompt from the base (SFT) policy.

    For each prompt the sample the calibrated reward model scores highest is chosen
    (first on ties, np.argmax), and, for reference, the one the oracle scores highest.
    Reports the mean oracle score of each choice, the mean over all samples (best-of-1),
    and the analytic KL of best-of-n to the base policy, log n - (n - 1)/n (Stiennon et
    al., 2020, appendix; `best_of_n_kl`).
    """
    rm, oracle = np.asarray(rm, np.float64), np.asarray(oracle, np.float64)
    if rm.shape != oracle.shape or rm.ndim != 2:
        raise ValueError(f"rm {rm.shape} and oracle {oracle.shape} scores must both be [P, n]")
    rows = np.arange(rm.shape[0])
    rm_pick, oracle_pick = np.argmax(rm, axis=1), np.argmax(oracle, axis=1)
    return {
        "n": int(rm.shape[1]),
        "rm_chosen": rm_pick.tolist(),
        "oracle_chosen": oracle_pick.tolist(),
        "rm_chosen_oracle_score": float(np.mean(oracle[rows, rm_pick])),
        "rm_chosen_rm_score": float(np.mean(rm[rows, rm_pick])),
        "oracle_chosen_oracle_score": float(np.mean(oracle[rows, oracle_pick])),
        "mean_oracle_score": float(np.mean(oracle)),
        "kl": best_of_n_kl(int(rm.shape[1])),
    }
