"""`flaxlm rlhf-eval`: compare the SFT policy, best-of-n and RLHF policies on held-out prompts.

    flaxlm rlhf-eval --sft runs/sft --reward runs/reward --policy runs/ppo \\
        --policy runs/ppo_oracle --prompts eval_prompts.jsonl --task addition \\
        --n 16 --out results.json

Per policy (SFT and each --policy), n samples per prompt at the same fixed key: mean
oracle score, mean calibrated reward-model score, KL to the SFT policy (nats per
response), the reward model's pairwise accuracy against the noiseless oracle on that
policy's samples, response length and eos rate. Best-of-n on the SFT samples: the
oracle score of the reward model's pick and of the oracle's pick, with the analytic KL
log n - (n - 1)/n. rlhf/evaluate.py has the definitions. Prints a table and writes the
same numbers as JSON to --out.

Prompts: a JSONL of {"prompt": ...} (or {"messages": [...]}, its last user turn) as
rlhf/labeler.py writes them. --max-new-tokens defaults to the first PPO-style policy's
`ppo.max_new_tokens`, else the reward model's calibration budget.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from model import sharding as sh
from model.config import ModelConfig
from model.generate import SamplingConfig
from model.tokenizer import AnyTokenizer, load_tokenizer
from model.transformer import Transformer
from rlhf import evaluate as ev
from rlhf import rollout as ro
from rlhf.policy_stage import load_reward_parent
from rlhf.tasks import load_task
from train.parent import InitFromError, Parent, check_tokenizer, load_params, read_parent
from train.reward import reward_model
from train.state import abstract_sharded_params


def read_prompts(path: str) -> list[str]:
    """User turns from a prompts JSONL: "prompt", or the last user turn of "messages"."""
    prompts = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            if "prompt" in record:
                prompts.append(str(record["prompt"]))
                continue
            users = [m["content"] for m in record.get("messages", []) if m["role"] == "user"]
            if not users:
                raise ValueError(f"{path}:{number}: no 'prompt' and no user turn")
            prompts.append(str(users[-1]))
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def load_policy(path: str, tokenizer: AnyTokenizer, mesh: jax.sharding.Mesh, rules: sh.Rules):
    """(parent, model, params) of an LM checkpoint (SFT, PPO, DPO, GRPO: `params`)."""
    parent = read_parent(path)
    if parent.stage == "reward":
        raise InitFromError(f"{parent.checkpoint} is a reward model, not a policy")
    check_tokenizer(parent, tokenizer.fingerprint, "the SFT policy's tokenizer")
    model = Transformer(ModelConfig(**parent.model))
    return parent, model, load_params(parent, abstract_sharded_params(model, mesh, rules))


def default_max_new_tokens(policies: Sequence[Parent], calibration: dict) -> int:
    for parent in policies:
        ppo = (parent.meta.get("config") or {}).get("ppo") or {}
        if ppo.get("max_new_tokens"):
            return int(ppo["max_new_tokens"])
    return int(calibration.get("max_new_tokens") or 16)


def policy_row(name: str, path: str, samples: ev.Samples, rm: np.ndarray, oracle: Any) -> dict:
    row: dict[str, Any] = {"name": name, "path": path, "rm_score": float(np.mean(rm))}
    if oracle is not None:
        row["oracle_score"] = float(np.mean(oracle))
        acc = ev.rm_pairwise_accuracy(rm, oracle)
        row["rm_pairwise_accuracy"], row["rm_pairs"] = acc["accuracy"], acc["pairs"]
    return row | ev.response_stats(samples)


@dataclasses.dataclass(frozen=True)
class References:
    """The runs every policy is measured against: the SFT policy (its tokenizer is the
    evaluation's) and the calibrated reward model."""

    tokenizer: AnyTokenizer
    sft_model: Transformer
    sft_params: Any
    rm: Transformer
    rm_cfg: ModelConfig
    rm_params: Any
    calibration: dict


def load_references(sft: str, reward: str, mesh: jax.sharding.Mesh, rules: sh.Rules) -> References:
    sft_parent = read_parent(sft)
    if sft_parent.tokenizer_dir is None:
        raise InitFromError(f"{sft_parent.checkpoint} records no tokenizer")
    tokenizer = load_tokenizer(sft_parent.tokenizer_dir)
    _, sft_model, sft_params = load_policy(sft, tokenizer, mesh, rules)
    rm_parent, rm_cfg, calibration = load_reward_parent(
        ml_collections.ConfigDict({"reward_from": reward}), tokenizer
    )
    rm = reward_model(rm_cfg)
    rm_params = load_params(rm_parent, abstract_sharded_params(rm, mesh, rules))
    return References(tokenizer, sft_model, sft_params, rm, rm_cfg, rm_params, calibration)


def check_lengths(prompt_len: int, max_new: int, configs: list[tuple[str, ModelConfig]]) -> None:
    """Refuse a prompt + response budget longer than any model's max_seq_len."""
    for name, cfg in configs:
        if prompt_len + max_new > cfg.max_seq_len:
            raise ValueError(
                f"prompt length {prompt_len} + max_new_tokens {max_new} exceeds the "
                f"max_seq_len={cfg.max_seq_len} of {name}"
            )


@dataclasses.dataclass(frozen=True)
class Scorer:
    """Samples a policy on the held-out prompts (the same key for every policy) and scores
    the samples with the reward model and, when there is a task, its oracle."""

    refs: References
    task: Any
    prompts: list[str]
    n: int
    key: jax.Array
    prompt_len: int
    max_new: int
    sampling: SamplingConfig
    mesh: jax.sharding.Mesh
    rules: sh.Rules
    batch_size: int

    def sample(self, model: Transformer, params: Any) -> ev.Samples:
        return ev.policy_samples(
            model,
            params,
            self.refs.tokenizer,
            self.prompts,
            self.n,
            self.key,
            prompt_len=self.prompt_len,
            max_new_tokens=self.max_new,
            sampling=self.sampling,
            mesh=self.mesh,
            rules=self.rules,
            batch_size=self.batch_size,
        )

    def scores(self, samples: ev.Samples) -> tuple[np.ndarray, Any]:
        refs = self.refs
        rm_values = ev.rm_scores(
            refs.rm, refs.rm_params, refs.calibration, samples, self.mesh, self.rules
        )
        oracle = (
            None
            if self.task is None
            else ev.oracle_scores(self.task, self.prompts, samples.responses)
        )
        return rm_values, oracle


def policy_rows(
    scorer: Scorer, sft: str, policy_paths: Sequence[str], policies: list[tuple]
) -> tuple[list[dict], np.ndarray, Any]:
    """(one row per policy, SFT first; the SFT samples' RM and oracle scores)."""
    refs = scorer.refs
    sft_samples = scorer.sample(refs.sft_model, refs.sft_params)
    sft_rm, sft_oracle = scorer.scores(sft_samples)
    rows = [policy_row("sft", sft, sft_samples, sft_rm, sft_oracle) | {"kl_to_sft": 0.0}]
    names = {"sft"}
    for path, (_, model, params) in zip(policy_paths, policies, strict=True):
        name = pathlib.Path(path).resolve().name
        name = name if name not in names else f"{name}_{len(names)}"
        names.add(name)
        samples = scorer.sample(model, params)
        rm_values, oracle = scorer.scores(samples)
        kl = ev.sequence_kl(
            model,
            params,
            refs.sft_model,
            refs.sft_params,
            samples,
            scorer.sampling,
            scorer.mesh,
            scorer.rules,
        )
        rows.append(policy_row(name, path, samples, rm_values, oracle) | {"kl_to_sft": kl})
    return rows, sft_rm, sft_oracle


def run(args: argparse.Namespace) -> dict[str, Any]:
    mesh = sh.make_mesh(-1, args.fsdp, 1)
    rules = sh.get_rules("fsdp")
    refs = load_references(args.sft, args.reward, mesh, rules)
    task = load_task(args.task) if args.task else None
    prompts = read_prompts(args.prompts)[: args.max_prompts or None]
    policies = [load_policy(p, refs.tokenizer, mesh, rules) for p in args.policy]
    max_new = args.max_new_tokens or default_max_new_tokens(
        [p for p, _, _ in policies], refs.calibration
    )
    prompt_len = max(
        len(refs.tokenizer.encode_chat([{"role": "user", "content": p}], True)[0]) for p in prompts
    )
    check_lengths(
        prompt_len,
        max_new,
        [("SFT", refs.sft_model.config), ("reward model", refs.rm_cfg)]
        + [(p, m.config) for p, (_, m, _) in zip(args.policy, policies, strict=True)],
    )
    sampling = ro.sampling_for(
        SamplingConfig(args.temperature, 0, 1.0), refs.sft_model.config.vocab_size, refs.tokenizer
    )
    scorer = Scorer(
        refs=refs,
        task=task,
        prompts=prompts,
        n=args.n,
        key=jax.random.key(args.seed),
        prompt_len=prompt_len,
        max_new=max_new,
        sampling=sampling,
        mesh=mesh,
        rules=rules,
        batch_size=args.batch_size,
    )
    rows, sft_rm, sft_oracle = policy_rows(scorer, args.sft, args.policy, policies)
    result: dict[str, Any] = {
        "prompts": args.prompts,
        "num_prompts": len(prompts),
        "n": args.n,
        "task": args.task or None,
        "seed": args.seed,
        "temperature": args.temperature,
        "max_new_tokens": max_new,
        "reward": args.reward,
        "policies": rows,
    }
    if task is not None:
        best = ev.best_of_n(sft_rm, sft_oracle)
        result["best_of_n"] = {k: v for k, v in best.items() if not k.endswith("_chosen")}
    return result


def fmt(value: Any, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def table(result: dict[str, Any]) -> str:
    """The printed summary: one row per policy, then best-of-n."""
    head = f"{'policy':<16} {'oracle':>7} {'rm':>7} {'kl_sft':>7} {'rm_acc':>7} {'pairs':>6}"
    lines = [
        f"{result['num_prompts']} prompts x n={result['n']}, T={result['temperature']}, "
        f"max_new_tokens={result['max_new_tokens']}, seed={result['seed']}",
        head,
    ]
    for row in result["policies"]:
        lines.append(
            f"{row['name'][:16]:<16} {fmt(row.get('oracle_score')):>7} {fmt(row['rm_score']):>7} "
            f"{fmt(row['kl_to_sft']):>7} {fmt(row.get('rm_pairwise_accuracy')):>7} "
            f"{fmt(row.get('rm_pairs'), 'd'):>6}"
        )
    best = result.get("best_of_n")
    if best:
        lines.append(
            f"best-of-{best['n']} on SFT samples (analytic KL {best['kl']:.3f}): oracle score "
            f"{best['rm_chosen_oracle_score']:.3f} RM-chosen, "
            f"{best['oracle_chosen_oracle_score']:.3f} oracle-chosen "
            f"(best-of-1 {best['mean_oracle_score']:.3f})"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="flaxlm rlhf-eval",
        description="held-out RLHF evaluation: oracle, RM score, KL to SFT, best-of-n",
    )
    parser.add_argument("--sft", required=True, help="the SFT run (reference policy)")
    parser.add_argument("--reward", required=True, help="a calibrated `flaxlm reward` run")
    parser.add_argument("--policy", action="append", default=[], help="RLHF runs (repeatable)")
    parser.add_argument("--prompts", required=True, help="held-out prompts JSONL")
    parser.add_argument("--task", default="", help="oracle: addition, sort or module:Class")
    parser.add_argument("--n", type=int, default=16, help="samples per prompt")
    parser.add_argument("--out", default="", help="write the results here as JSON")
    parser.add_argument("--max-prompts", type=int, default=0, help="0 = all")
    parser.add_argument("--max-new-tokens", type=int, default=0, help="0 = from the runs")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=256, help="rows sampled at once")
    parser.add_argument("--fsdp", type=int, default=1, help="devices splitting parameters")
    args = parser.parse_args(argv)
    if args.n < 1 or args.batch_size < 1 or args.temperature <= 0:
        parser.error("--n and --batch-size must be >= 1 and --temperature > 0")
    return args


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    try:
        result = run(args)
    except (ValueError, FileNotFoundError) as err:  # StageError, InitFromError included
        print(f"flaxlm rlhf-eval: error: {err}", file=sys.stderr)
        return 2
    result["seconds"] = time.perf_counter() - start
    print(table(result))
    if args.out and jax.process_index() == 0:
        pathlib.Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0
