"""The tiny RL chain the PPO, DPO, GRPO and RLHF-eval tests share: pretrain → SFT →
calibrated reward runs on Addition data from rlhf/labeler.py, built once per test session
(tests/conftest.py `rl_chain`)."""

from __future__ import annotations

import json
import pathlib

import numpy as np

from rlhf import labeler as lab
from rlhf import tasks
from train import pretrain, reward, sft

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def ranked_rows(task: tasks.Addition, prompts: list[str], rng: np.random.Generator) -> list:
    """Per prompt, four candidate sums (right, carry-free, one digit off, random), ranked
    by the noisy labeler."""
    rows = []
    for prompt in prompts:
        a, b = task.parse(prompt)
        right = str(a + b)
        off = right[:-1] + str((int(right[-1]) + 1 + rng.integers(9)) % 10)
        candidates = [right, str(task.carry_free_sum(a, b)), off, str(rng.integers(10, 200))]
        row = lab.ranked_record(task, prompt, candidates, rng)
        if row is not None:
            rows.append(row)
    return rows


def stage_args(config: str, workdir: pathlib.Path, data_dir: pathlib.Path, *extra: str) -> list:
    return [
        "--config",
        f"{CONFIGS / config}:tiny",
        "--workdir",
        str(workdir),
        f"--config.data.data_dir={data_dir}",
        *extra,
    ]


def make_chain(root: pathlib.Path) -> dict:
    """Tiny pretrain → SFT → calibrated reward runs on Addition, plus ranked DPO data:
    `dpo_ranked` (48 training prompts, the labeler's ranks) and `ranked_eval` (the 32
    held-out prompts, the oracle's ranks)."""
    task, rng = tasks.Addition(), np.random.default_rng(0)
    paths = lab.write_task_data(task, root / "data", rng, 200, 512, 256, n_eval=32)
    tfds_dir = root / "tfds"
    pre, sft_dir, rm_dir = root / "pretrain", root / "sft", root / "reward"
    common = ("--config.eval.every_steps=0", "--config.total_steps=30")
    assert (
        pretrain.main(
            stage_args(
                "pretrain.py",
                pre,
                tfds_dir,
                "--config.data.name=",
                f"--config.data.path={paths['pretrain']}",
                "--config.eval.name=",
                *common,
            )
        )
        == 0
    )
    sft_args = (f"--config.init_from={pre}", f"--config.data.path={paths['sft']}", *common)
    assert sft.main(stage_args("sft.py", sft_dir, tfds_dir, *sft_args)) == 0
    rows = ranked_rows(task, task.prompts(rng, 512), rng)
    ranked = root / "ranked.jsonl"
    lab.write_jsonl(ranked, rows)
    lab.write_jsonl(root / "dpo_ranked.jsonl", rows[:48])
    with open(paths["eval_prompts"], encoding="utf-8") as f:
        held_out = [json.loads(line)["prompt"] for line in f]
    lab.write_jsonl(root / "ranked_eval.jsonl", oracle_ranked(task, held_out, rng))
    rm_args = (
        f"--config.init_from={sft_dir}",
        f"--config.data.path={ranked}",
        f"--config.calibration.prompts_path={paths['eval_prompts']}",
        *common,
    )
    assert reward.main(stage_args("reward.py", rm_dir, tfds_dir, *rm_args)) == 0
    paths |= {"dpo_ranked": str(root / "dpo_ranked.jsonl")}
    paths |= {"ranked_eval": str(root / "ranked_eval.jsonl")}
    return {"root": root, "paths": paths, "sft": sft_dir, "reward": rm_dir, "tfds": tfds_dir}


def oracle_ranked(task: tasks.Addition, prompts: list[str], rng: np.random.Generator) -> list:
    """tests/test_ppo.py's candidates, ranked by the exact oracle (no labeler noise): the
    held-out reward accuracy then measures agreement with the truth."""
    rows = []
    for row in ranked_rows(task, prompts, rng):
        ranks = lab.dense_ranks([task.score(row["prompt"], r) for r in row["responses"]])
        if max(ranks) > 0:
            rows.append({**row, "ranking": ranks})
    return rows
