"""The pipeline's stages: what each reads and writes, and how it is linked to the others.

Training stages run through their own stage code (train/stage.py `run_stage`) on the
pipeline's section of their config, with the links filled in here: data paths, the
`init_from` / `reward_from` workdirs, the task, the tokenizer, the seed and a TFDS
data_dir inside the workdir. The data stages (data, tokenizer, rm_data) write into a
temporary directory and rename it when complete, so an interrupted one leaves nothing
half-written and is simply redone.
"""

from __future__ import annotations

import json
import pathlib
import sys
from typing import Any

import ml_collections
import numpy as np

from configs import stages
from orchestrate.workdir import (
    data_paths,
    fresh_tmp,
    has_records,
    read_prompts,
    replace_dir,
    start_policy,
)
from rlhf.tasks import load_task


def check(config: ml_collections.ConfigDict) -> None:
    """Fail before anything is written: the task loads, K >= 2, sections exist, the base
    model (`init_from`) is a run directory."""
    load_task(config.task)  # ValueError naming the task path
    if config.init_from and not (pathlib.Path(config.init_from) / "checkpoints").is_dir():
        raise ValueError(
            f"init_from={config.init_from}: not a flaxlm run directory (no checkpoints/); "
            "import a checkpoint first with `flaxlm import-hf` or `flaxlm import-gguf`"
        )
    if config.rm_data.k < 2:
        raise ValueError(f"rm_data.k={config.rm_data.k}: the labeler needs K >= 2")
    if config.rm_data.num_prompts < 1 or config.rm_data.num_prompts > config.data.n_prompts:
        raise ValueError(
            f"rm_data.num_prompts={config.rm_data.num_prompts} must be in [1, data.n_prompts="
            f"{config.data.n_prompts}]"
        )
    if config.labeler.kind not in ("simulated", "human"):
        raise ValueError(f"labeler.kind={config.labeler.kind!r}: choose simulated or human")
    if config.tokenizer.type not in ("char", "bpe", "unigram"):
        raise ValueError(f"tokenizer.type={config.tokenizer.type!r}: choose char, bpe or unigram")


def set_key(config: ml_collections.ConfigDict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = config
    for part in parents:
        node = node[part]
    node[leaf] = value


def stage_config(
    config: ml_collections.ConfigDict, stage: str, workdir: pathlib.Path
) -> ml_collections.ConfigDict:
    """The stage's section of the pipeline config with the links to the other stages."""
    p = data_paths(workdir)
    policy = start_policy(config, workdir)
    c = ml_collections.ConfigDict(config[stages.BY_NAME[stage].section].to_dict())  # a copy
    links: dict[str, Any] = {"seed": config.seed, "data.data_dir": str(workdir / "tfds")}
    if stage == "pretrain":
        links |= {"data.path": p["pretrain"], "data.tokenizer": p["tokenizer"]}
        links |= {"data.doc_mode": "blank_line"}
    elif stage == "sft":
        links |= {"init_from": config.init_from or workdir / "pretrain", "data.path": p["sft"]}
        links |= {"eval.path": p["sft_eval"]}
    elif stage == "reward":
        links |= {"init_from": policy, "data.path": p["ranked"]}
        links |= {"eval.path": p["ranked_eval"], "calibration.prompts_path": p["eval_prompts"]}
        links |= {"reward.max_responses": config.rm_data.k}
        if not has_records(p["ranked_eval"]):  # every held-out group tied: nothing to score
            links |= {"eval.path": "", "eval.every_steps": 0}
    elif stage in ("ppo", "ppo_oracle", "grpo"):
        links |= {"init_from": policy, "reward_from": workdir / "reward"}
        links |= {"data.path": p["prompts"], "eval.path": p["eval_prompts"], "task": config.task}
        if stage == "ppo_oracle":
            links |= {"ppo.reward": "oracle"}
    elif stage == "dpo":
        links |= {"init_from": policy, "data.path": p["ranked"]}
        links |= {"eval.path": p["ranked_eval"], "task": config.task}
    with c.unlocked():
        for key, value in links.items():
            set_key(c, key, str(value) if isinstance(value, pathlib.Path) else value)
    return c


# ----------------------------------------------------------------------------- data stages


def run_data(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> int:
    from rlhf.labeler import write_task_data

    task = load_task(config.task)
    d = config.data
    final = workdir / "data"
    tmp = fresh_tmp(final)
    paths = write_task_data(
        task, tmp, np.random.default_rng(config.seed), d.n_docs, d.n_sft, d.n_prompts, d.n_eval
    )
    replace_dir(tmp, final)
    print(f"data: {', '.join(pathlib.Path(v).name for v in paths.values())} in {final}")
    return 0


def run_tokenizer(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> int:
    from model.tokenizer import train_tokenizer, training_sentences

    path = data_paths(workdir)["pretrain"]
    with path.open(encoding="utf-8") as f:
        tokenizer = train_tokenizer(
            training_sentences(f), config.tokenizer.vocab_size, config.tokenizer.type
        )
    final = data_paths(workdir)["tokenizer"]
    tmp = fresh_tmp(final)
    tokenizer.save(tmp)
    replace_dir(tmp, final)
    print(f"tokenizer: {config.tokenizer.type}, {tokenizer.vocab_size} pieces -> {final}")
    return 0


def run_rm_data(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> int:
    """K samples of the SFT policy per prompt, ranked by the labeler (train) and by the
    noiseless oracle (held out)."""
    import jax

    from rlhf import rm_data
    from rlhf.labeler import Labeler, write_jsonl
    from train.sample import Policy

    r, p = config.rm_data, data_paths(workdir)
    task = load_task(config.task)
    human = config.labeler.kind == "human"
    if human and (p["ranked"].parent / CANDIDATES).is_file():
        return human_rm_data_status(config, p["ranked"].parent, task)
    policy = Policy(str(start_policy(config, workdir)))
    key = jax.random.fold_in(jax.random.key(config.seed), 7)
    labeler = Labeler(config.labeler.random_rate, config.labeler.score_noise)
    final = p["ranked"].parent
    tmp = fresh_tmp(final)
    summary = {}
    # The held-out groups may all tie (a policy that never answers right): the reward
    # stage then runs without its held-out evaluation.
    for name, prompts_path, limit, who in (
        ("ranked", p["prompts"], r.num_prompts, labeler),
        ("ranked_eval", p["eval_prompts"], None, Labeler(random_rate=0.0)),
    ):
        prompts = read_prompts(prompts_path, limit)
        groups = sample_k(
            config, policy, prompts, jax.random.fold_in(key, len(summary)), f"rm_data: {name}"
        )
        if human and name == "ranked":  # people rank these with `flaxlm label`
            kept = write_jsonl(tmp / CANDIDATES, candidate_records(prompts, groups))
            summary[name] = {"candidates": kept, "dropped_all_tied": len(prompts) - kept}
            continue
        rng = np.random.default_rng([config.seed, len(summary)])
        records, summary[name] = rm_data.ranked_records(
            task, prompts, groups, who, rng, allow_empty=name == "ranked_eval"
        )
        write_jsonl(tmp / f"{name}.jsonl", records)
        print(f"rm_data: {name}: {json.dumps(summary[name])}")
    (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if human:
        (tmp / "label.json").write_text(json.dumps(label_meta(config), indent=2) + "\n")
    replace_dir(tmp, final)
    return human_rm_data_status(config, final, task) if human else 0


def sample_k(
    config: ml_collections.ConfigDict, policy: Any, prompts: list[str], key: Any, desc: str
) -> list[list[str]]:
    """K responses per prompt from `policy` (a train.sample.Policy) at the rm_data
    stage's settings (K, temperature, new tokens, batch size): [len(prompts)][K]."""
    from model.generate import SamplingConfig
    from rlhf import rm_data
    from rlhf import rollout as ro

    r = config.rm_data
    sampling = ro.sampling_for(
        SamplingConfig(temperature=r.temperature), policy.config.vocab_size, policy.tokenizer
    )
    return rm_data.sample_groups(
        policy.model,
        policy.params,
        policy.tokenizer,
        prompts,
        r.k,
        key,
        prompt_len=config.ppo.seq_len,
        max_new_tokens=r.max_new_tokens,
        sampling=sampling,
        batch_size=r.batch_size,
        mesh=policy.mesh,
        rules=policy.rules,
        desc=desc,
    )


# With labeler.kind=human the stage stops with this exit code until every candidate is
# ranked (or skipped); rerunning the pipeline then continues.
WAITING_FOR_LABELS = 3
CANDIDATES = "candidates.jsonl"


def candidate_records(prompts: list[str], groups: list[list[str]]) -> list[dict]:
    """Candidates to rank; groups whose K responses are all the same are left out (no
    ranking of them could carry a preference)."""
    return [
        {"prompt": p, "responses": list(g)}
        for p, g in zip(prompts, groups, strict=True)
        if len(set(g)) > 1
    ]


def label_meta(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """What the candidates were sampled with (checked on resume) and what `flaxlm label
    --agreement` needs: the task and the simulated labeler to compare with."""
    labeler = {k: v for k, v in config.labeler.to_dict().items() if k != "kind"}
    return {"task": config.task, "seed": config.seed, "rm_data": config.rm_data.to_dict()} | {
        "labeler": labeler
    }


def human_rm_data_status(
    config: ml_collections.ConfigDict, directory: pathlib.Path, task: Any
) -> int:
    """0 once every candidate has an answer (the summary then gets the human figures);
    otherwise a line saying how many remain and how to rank them, and WAITING_FOR_LABELS."""
    from rlhf import label_agreement, label_store
    from rlhf.labeler import Labeler, pairwise_agreement

    meta = json.loads((directory / "label.json").read_text())
    current = label_meta(config)
    changed = [k for k in ("task", "seed", "rm_data") if meta.get(k) != current[k]]
    if changed:
        raise ValueError(
            f"{directory / CANDIDATES} was sampled with another {', '.join(changed)}; rerun "
            "with --from-stage rm_data (the old directory is kept under replaced/)"
        )
    store = label_store.LabelStore(directory)
    counts = label_store.summary(store)
    if counts["remaining"]:
        print(
            f"rm_data: {counts['remaining']} of {counts['candidates']} prompts still unranked "
            f"({counts['rankings']} rankings so far): run `flaxlm label --workdir {directory}`, "
            "then rerun this command",
            file=sys.stderr,
        )
        return WAITING_FOR_LABELS
    if not counts["rankings"]:
        raise ValueError(f"{directory}: every prompt was skipped; nothing to train on")
    rows = label_agreement.agreement_rows(store, task, Labeler(**meta["labeler"]))
    path = directory / "summary.json"
    summary = json.loads(path.read_text())
    # The keys the simulated path writes (the report reads them), pooled over labelers.
    agree, pairs = 0.0, 0
    for answer, _, _ in store.answers():
        if answer.ranking is not None:
            c = store.by_id[answer.id]
            scores = [float(task.score(c.prompt, r)) for r in c.responses]
            a, n = pairwise_agreement(scores, answer.ranking)
            agree, pairs = agree + a, pairs + n
    summary["ranked"] |= {
        "groups": counts["rankings"],
        "labeler_agreement": agree / pairs if pairs else float("nan"),
        "pairs": pairs,
        "human": counts | {"agreement": rows},
    }
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    tmp.replace(path)
    print(f"rm_data: human rankings: {json.dumps(counts)}")
    return 0


# ----------------------------------------------------------------------------- dispatch


def run_training(stage: str, config: ml_collections.ConfigDict, workdir: pathlib.Path) -> int:
    import importlib

    from train.stage import run_stage

    c = stage_config(config, stage, workdir)
    stage_dir = workdir / stage
    module = importlib.import_module(stages.BY_NAME[stage].module)
    if stage == "reward":  # its run adds the reward model's calibration after training
        return module.run(c, stage_dir)
    build = module.build
    return run_stage(stage, stage_dir, c, lambda: build(c, stage_dir))


def run(stage: str, config: ml_collections.ConfigDict, workdir: pathlib.Path) -> int:
    if stage in stages.TRAINING:
        return run_training(stage, config, workdir)
    if stage == "report":
        from orchestrate import pipeline_report

        return pipeline_report.run(config, workdir)
    runner = {"data": run_data, "tokenizer": run_tokenizer, "rm_data": run_rm_data}[stage]
    try:
        return runner(config, workdir)
    except (ValueError, FileNotFoundError) as err:
        print(f"flaxlm pipeline: {stage}: error: {err}", file=sys.stderr)
        return 2
