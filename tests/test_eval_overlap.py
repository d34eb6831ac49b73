"""train/data/eval_overlap.py `warning`: a run whose eval set is read from a file its training
data also reads gets one warning line at build time; disjoint parts of one file do not.
The cases are written out by hand (which file each side reads)."""

from __future__ import annotations

import pathlib

import pytest

from configs import loader
from train import stage
from train.data import eval_overlap

ROOT = pathlib.Path(__file__).resolve().parents[1]


def config(name: str, *overrides: str):
    return loader.load(f"{ROOT}/configs/{name}.py:tiny", ["eval.every_steps=5", *overrides])


@pytest.fixture
def files(tmp_path) -> dict[str, pathlib.Path]:
    out = {}
    for name in ("a.jsonl", "b.jsonl", "corpus.txt"):
        out[name] = tmp_path / "data" / name
        out[name].parent.mkdir(exist_ok=True)
        out[name].write_text("x\n")
    return out


def test_the_same_file_on_both_sides_is_named(files):
    a = files["a.jsonl"]
    line = eval_overlap.warning(config("sft", f"data.path={a}", f"eval.path={a}"))
    assert line == (
        f"warning: the eval set (eval.path={a}) is read from {a.resolve()}, which the "
        f"training data (data.path={a}) also reads: eval metrics include training text"
    )
    glob = f"{a.parent}/*.jsonl"  # a glob that takes in the eval file
    line = eval_overlap.warning(config("sft", f"data.path={glob}", f"eval.path={a}"))
    assert line is not None and f"data.path={glob}" in line


def test_separate_files_and_eval_off_are_quiet(files):
    a, b = files["a.jsonl"], files["b.jsonl"]
    assert eval_overlap.warning(config("sft", f"data.path={a}", f"eval.path={b}")) is None
    off = config("sft", f"data.path={a}", f"eval.path={a}", "eval.every_steps=0")
    assert eval_overlap.warning(off) is None
    missing = f"{a.parent}/nothing*.jsonl"  # the build reports a glob matching nothing
    assert eval_overlap.warning(config("sft", f"data.path={missing}", f"eval.path={a}")) is None


def test_preset_eval_split_cut_from_the_training_file(files):
    corpus = files["corpus.txt"]
    copy = f"data.local_copy={corpus}"
    # Training on the whole file while evaluating on the preset's split of it: overlap.
    line = eval_overlap.warning(config("pretrain", f"data.path={corpus}", copy))
    assert line is not None
    assert "eval.name=tiny_shakespeare (split validation+test, from data.local_copy)" in line
    assert f"data.path={corpus}" in line
    # The preset's train split against its validation+test split: disjoint parts.
    assert eval_overlap.warning(config("pretrain", copy)) is None
    # Sliced splits of one file on both sides: disjoint parts; a whole split and a slice
    # of it: overlap.
    both = [f"data.path={corpus}", f"eval.path={corpus}"]
    sliced = ["data.split=train[:90%]", "eval.split=train[90%:]"]
    assert eval_overlap.warning(config("pretrain", *both, *sliced)) is None
    whole = config("pretrain", *both, "eval.split=train[90%:]")
    assert eval_overlap.warning(whole) is not None


def test_run_stage_warns_once_before_building(files, tmp_path, capsys):
    a = files["a.jsonl"]
    c = config("sft", f"data.path={a}", f"eval.path={a}")

    def build():
        raise stage.StageError("stopped after the check")

    assert stage.run_stage("sft", tmp_path / "run", c, build) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"flaxlm sft: {eval_overlap.warning(c)}",
        "flaxlm sft: error: stopped after the check",
    ]
