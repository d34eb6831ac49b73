"""Damaged checkpoints: a truncated array file, a deleted file, a garbage byte inside the
array data, an empty step directory, and a newer checkpoint of another model shape.

Expectation: the damage is reported naming the checkpoint and what is wrong, the newest
intact checkpoint is used (the recovered run's metrics equal an uninterrupted run's), the
damaged one is moved to checkpoints_damaged/ (never deleted). Another model shape is not
damage: the run is refused naming the key, and nothing in the workdir changes."""

from __future__ import annotations

import os
import pathlib
import shutil

import pytest

from tests.faults import harness
from tests.faults.conftest import task_pretrain_args

EXPECT = "reported by name; resumes from the newest intact checkpoint; damaged one kept aside"


def pretrain_args(chain: dict, workdir: pathlib.Path, *extra: str) -> list[str]:
    return task_pretrain_args(chain, workdir, "--config.checkpoint.every_steps=4", *extra)


@pytest.fixture(scope="module")
def runs(task_data, tmp_path_factory) -> dict[str, pathlib.Path]:
    """`base`: checkpoints 4 and 8 of a 10-step run stopped at 8; `straight`: the
    uninterrupted 10 steps."""
    root = tmp_path_factory.mktemp("damage")
    out = {"base": root / "base", "straight": root / "straight"}
    for name, extra in (("base", ["--config.stop_at_step=8"]), ("straight", [])):
        log = root / f"{name}.log"
        args = pretrain_args(task_data, out[name], "--config.total_steps=10", *extra)
        assert harness.run("pretrain", args, log) == 0, harness.tail(log)
    return out


def state_files(step_dir: pathlib.Path) -> list[pathlib.Path]:
    """The array data files of a checkpoint, largest first."""
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and "/d/" in str(p)]
    return sorted(files, key=lambda p: -p.stat().st_size)


def truncate(step: pathlib.Path) -> str:
    target = state_files(step)[0]
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 3])
    return f"truncated {target.relative_to(step)} to a third"


def delete(step: pathlib.Path) -> str:
    target = state_files(step)[0]
    target.unlink()
    return f"deleted {target.relative_to(step)}"


def garbage_byte(step: pathlib.Path) -> str:
    target = state_files(step)[0]
    data = bytearray(target.read_bytes())
    middle = len(data) // 2
    data[middle] ^= 0xFF
    target.write_bytes(bytes(data))
    return f"flipped byte {middle} of {target.relative_to(step)}"


def empty_dir(step: pathlib.Path) -> str:
    shutil.rmtree(step)
    step.mkdir()
    return "replaced checkpoints/8 by an empty directory"


DAMAGE = {
    "truncated array file": truncate,
    "deleted array file": delete,
    "garbage byte in array data": garbage_byte,
    "empty step directory": empty_dir,
}


def snapshot(workdir: pathlib.Path) -> dict[str, tuple[int, float]]:
    return {
        str(p.relative_to(workdir)): (p.stat().st_size, p.stat().st_mtime)
        for p in workdir.rglob("*")
        if p.is_file()
    }


# All slow: CI already restores past a truncated checkpoint in tests/test_pretrain.py.
# A flipped byte in OCDBT array data restores silently in Orbax: integrity.json catches it.
KINDS = [pytest.param(k, marks=pytest.mark.slow) for k in DAMAGE]


@pytest.mark.parametrize("kind", KINDS)
def test_damaged_newest_checkpoint_falls_back(kind, runs, task_data, tmp_path):
    chain = task_data
    workdir = tmp_path / "run"
    shutil.copytree(runs["base"], workdir)
    with harness.case("checkpoint", "pretrain", kind, "newest of 2 checkpoints", EXPECT) as info:
        what = DAMAGE[kind](workdir / "checkpoints" / "8")
        result = harness.run_capture(
            "pretrain", pretrain_args(chain, workdir, "--config.total_steps=10")
        )
        err = result.stderr
        reported = [line for line in err.splitlines() if "is damaged" in line]
        info["detail"] = f"{what}; exit {result.returncode}; " + (
            reported[0][reported[0].find("checkpoints/") :][:160]
            if reported
            else "no damage reported"
        )
        assert reported and "checkpoints/8" in reported[0], (
            f"damage not reported (exit {result.returncode})"
        )
        assert result.returncode == 0, f"exit {result.returncode}: {err[-1500:]}"
        assert "resuming from checkpoint step 4" in err, "did not fall back to step 4"
        assert (workdir / "checkpoints_damaged" / "8").exists(), "damaged checkpoint not kept"
        problems = harness.diff_tables(
            harness.metric_table(runs["straight"] / "metrics.jsonl"),
            harness.metric_table(workdir / "metrics.jsonl"),
            "metrics",
        )
        assert not problems, "; ".join(problems[:3])


@pytest.mark.slow
def test_checkpoint_of_another_model_shape_is_refused(runs, task_data, tmp_path):
    """A newer checkpoint from a 3-layer run dropped into a 2-layer run's workdir."""
    chain = task_data
    other = tmp_path / "other"
    log = tmp_path / "other.log"
    args = pretrain_args(chain, other, "--config.total_steps=2", "--config.model.num_layers=3")
    assert harness.run("pretrain", args, log) == 0, harness.tail(log)
    workdir = tmp_path / "run"
    shutil.copytree(runs["base"], workdir)
    shutil.copytree(other / "checkpoints" / "2", workdir / "checkpoints" / "9")
    before = snapshot(workdir)
    expect = "refused naming the key; exit 2; nothing in the workdir written or moved"
    with harness.case(
        "checkpoint", "pretrain", "checkpoint of another model shape", "newest checkpoint", expect
    ) as info:
        result = harness.run_capture(
            "pretrain", pretrain_args(chain, workdir, "--config.total_steps=10")
        )
        info["detail"] = f"exit {result.returncode}: {result.stderr.strip().splitlines()[-1][:200]}"
        assert result.returncode == 2, result.stderr[-1500:]
        assert "model.num_layers" in result.stderr
        assert "Traceback" not in result.stderr
        assert snapshot(workdir) == before, "the workdir changed"


@pytest.mark.slow
def test_every_checkpoint_damaged_starts_over_and_keeps_them(runs, task_data, tmp_path):
    """Both checkpoints truncated: nothing is lost (both moved aside), the run starts
    from step 0 and ends where the uninterrupted run does."""
    chain = task_data
    workdir = tmp_path / "run"
    shutil.copytree(runs["base"], workdir)
    expect = "both reported and kept aside; starts from step 0; metrics equal"
    with harness.case(
        "checkpoint", "pretrain", "every checkpoint truncated", "2 of 2", expect
    ) as info:
        for step in ("4", "8"):
            truncate(workdir / "checkpoints" / step)
        result = harness.run_capture(
            "pretrain", pretrain_args(chain, workdir, "--config.total_steps=10")
        )
        info["detail"] = f"exit {result.returncode}"
        assert result.returncode == 0, result.stderr[-1500:]
        assert result.stderr.count("is damaged") == 2
        kept = sorted(os.listdir(workdir / "checkpoints_damaged"))
        assert kept == ["4", "8"], kept
        problems = harness.diff_tables(
            harness.metric_table(runs["straight"] / "metrics.jsonl"),
            harness.metric_table(workdir / "metrics.jsonl"),
            "metrics",
        )
        assert not problems, "; ".join(problems[:3])
