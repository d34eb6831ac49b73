"""Eval text read from the training files: a run whose eval set comes from a file its
training data also reads gets one warning line before it builds (the eval loss would
then measure text the model trained on)."""

from __future__ import annotations

import os

import ml_collections

PRESET_TEXT = "tiny_shakespeare"  # train/data/builders.py: its splits are cut from one file


def read_files(config: ml_collections.ConfigDict, section: str) -> tuple[set[str], bool]:
    """The files `<section>` reads its records from (real paths), and whether it reads only
    a part of them (a sliced split such as `train[:90%]`, or the preset's split of its
    file). Empty for a catalog dataset, a download or a glob that matches nothing (the
    build reports that one). A local path is read as open_text / open_records read it:
    the stage's split for pretraining text, the "train" group for every other stage."""
    from train.data import builders  # TFDS: only imported where a stage builds

    d = config[section]
    if d.path:
        split = d.split if config.get("stage", "pretrain") == "pretrain" else "train"
        parts = [p.strip() for p in split.split("+") if p.strip()]
        paths = d.path.to_dict() if isinstance(d.path, ml_collections.ConfigDict) else d.path
        try:
            groups = dict(builders.split_paths(paths))
        except (FileNotFoundError, ValueError, TypeError):
            return set(), False
        names = {p.split("[")[0] for p in parts}
        files = {os.path.realpath(f) for n in names for f in groups.get(n, ())}
        return files, any("[" in p for p in parts)
    if d.name == PRESET_TEXT and config.data.local_copy:
        return {os.path.realpath(config.data.local_copy)}, True
    return set(), False


def warning(config: ml_collections.ConfigDict) -> str | None:
    """One line when the eval set is read from a file the training data also reads (the
    eval loss then measures text the model trained on), else None.

    Parts of one file cut on both sides (a sliced split on each, or two splits of the
    preset) are taken as the intended disjoint cut; a whole file on one side and any part
    of it on the other is an overlap. Called once per run, before the build."""
    if not config.eval.every_steps or not (config.data.path or config.eval.path):
        return None
    train, train_part = read_files(config, "data")
    held, held_part = read_files(config, "eval")
    shared = sorted(train & held)
    if not shared or (train_part and held_part):
        return None

    def where(section: str) -> str:
        d = config[section]
        if d.path:
            return f"{section}.path={d.path}"
        return f"{section}.name={d.name} (split {d.split}, from data.local_copy)"

    return (
        f"warning: the eval set ({where('eval')}) is read from {shared[0]}, which the "
        f"training data ({where('data')}) also reads: eval metrics include training text"
    )
