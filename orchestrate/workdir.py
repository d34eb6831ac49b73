"""A pipeline workdir's layout and its bookkeeping files: where each stage's data lives,
which policy the later stages start from, atomic writes. Every orchestrate module reads
the workdir through these; none of them imports another for it."""

from __future__ import annotations

import json
import pathlib
import shutil
from typing import Any

import ml_collections

STATE_FILE = "pipeline.json"  # which stages finished, when, in how long


def read_state(workdir: pathlib.Path) -> dict[str, Any]:
    path = workdir / STATE_FILE
    return json.loads(path.read_text()) if path.is_file() else {"stages": {}}


def data_paths(workdir: pathlib.Path) -> dict[str, pathlib.Path]:
    d, rm = workdir / "data", workdir / "rm_data"
    return {
        "pretrain": d / "pretrain.txt",
        "sft": d / "sft.jsonl",
        "sft_eval": d / "sft_eval.jsonl",
        "prompts": d / "prompts.jsonl",
        "eval_prompts": d / "eval_prompts.jsonl",
        "ranked": rm / "ranked.jsonl",
        "ranked_eval": rm / "ranked_eval.jsonl",
        "rm_summary": rm / "summary.json",
        "tokenizer": workdir / "tokenizer",
    }


def start_policy(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> pathlib.Path:
    """The policy the reward model and RL start from: DIR/sft once the SFT stage has run
    here, else the base model (`init_from`, e.g. an imported checkpoint) as it is."""
    sft = workdir / "sft"
    if config.init_from and not (sft / "checkpoints").is_dir():
        return pathlib.Path(config.init_from)
    return sft


def read_prompts(path: pathlib.Path, limit: int | None = None) -> list[str]:
    rows = [json.loads(line)["prompt"] for line in path.read_text().splitlines() if line.strip()]
    return rows[:limit] if limit else rows


def has_records(path: pathlib.Path) -> bool:
    return path.is_file() and any(line.strip() for line in path.open())


def fresh_tmp(final: pathlib.Path) -> pathlib.Path:
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():  # left by an interrupted attempt
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def replace_dir(tmp: pathlib.Path, final: pathlib.Path) -> None:
    """Rename a completed temporary directory into place (replacing an older copy)."""
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
