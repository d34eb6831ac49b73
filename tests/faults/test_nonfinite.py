"""Numerical faults: a diverging run (learning rate 1e9, no clipping) makes the loss or
gradient NaN/inf. `nonfinite=stop`: exit 3 naming the step, no checkpoint at or after it,
every saved checkpoint finite. `nonfinite=skip`: the run completes, the bad updates are
discarded and counted (`skipped`), the final checkpoint is finite."""

from __future__ import annotations

import pathlib
import re

import numpy as np
import pytest

from tests.faults import harness
from tests.faults.conftest import task_pretrain_args


def diverging(chain: dict, workdir: pathlib.Path, policy: str) -> list[str]:
    return task_pretrain_args(
        chain,
        workdir,
        "--config.optim.lr=1e9",
        "--config.optim.clip_norm=0",
        "--config.optim.warmup_steps=0",
        "--config.total_steps=12",
        "--config.checkpoint.every_steps=1",
        f"--config.nonfinite={policy}",
    )


def checkpoint_params(step_dir: pathlib.Path) -> list[np.ndarray]:
    import orbax.checkpoint as ocp

    restored = ocp.PyTreeCheckpointer().restore(step_dir / "state")
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(restored["params"])]


def saved_steps(workdir: pathlib.Path) -> list[int]:
    directory = workdir / "checkpoints"
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


@pytest.mark.slow  # CI: tests/test_pretrain.py checks the stop (not the saved params)
def test_stop_policy_names_the_step_and_saves_nothing_poisoned(task_data, tmp_path):
    chain = task_data
    workdir = tmp_path / "run"
    expect = "exit 3 naming the step; checkpoints only before it, all finite"
    with harness.case(
        "numerics", "pretrain", "loss/gradient NaN or inf", "nonfinite=stop", expect
    ) as info:
        result = harness.run_capture("pretrain", diverging(chain, workdir, "stop"))
        found = re.search(r"non-finite loss or gradient at step (\d+)", result.stderr)
        info["detail"] = f"exit {result.returncode}: " + (found.group(0) if found else "no step")
        assert result.returncode == 3 and found, result.stderr[-1500:]
        bad = int(found.group(1))
        steps = saved_steps(workdir)
        info["detail"] += f"; checkpoints {steps}"
        assert all(s < bad for s in steps), steps
        for step in steps:
            leaves = checkpoint_params(workdir / "checkpoints" / str(step))
            assert all(np.isfinite(x).all() for x in leaves), f"checkpoint {step} holds NaN/inf"


@pytest.mark.slow
def test_skip_policy_counts_and_keeps_the_state_finite(task_data, tmp_path):
    chain = task_data
    workdir = tmp_path / "run"
    expect = "completes; bad updates discarded and counted; final checkpoint finite"
    with harness.case(
        "numerics", "pretrain", "loss/gradient NaN or inf", "nonfinite=skip", expect, suite="slow"
    ) as info:
        result = harness.run_capture("pretrain", diverging(chain, workdir, "skip"))
        assert result.returncode == 0, result.stderr[-1500:]
        table = harness.metric_table(workdir / "metrics.jsonl")
        skipped = sum(int(row.get("skipped", 0)) for row in table.values())
        info["detail"] = f"exit 0; {skipped} of 12 updates skipped"
        assert skipped > 0
        leaves = checkpoint_params(workdir / "checkpoints" / str(saved_steps(workdir)[-1]))
        assert all(np.isfinite(x).all() for x in leaves), "the final checkpoint holds NaN/inf"
