"""Fixtures of the fault suite: the session's results file (and, with
FLAXLM_WRITE_RELIABILITY=1, docs/reliability.md written from it at the end) and one tiny
pretrain → SFT → reward chain on the Addition task that later stages start from."""

from __future__ import annotations

import os
import pathlib
import shlex
import time

import numpy as np
import pytest

from tests.faults import harness
from tests.rl_chain import ranked_rows, stage_args

_STARTED = time.time()

NOTES = """
How to read it. *times* counts the faults actually injected (a signal point the run
finished before is not counted); *as expected* how many of them met the expectation in
the next column; *observed* what the suite saw (exit codes, messages, steps). Signal
points are seeded (`harness.points`): a signal kind, a training step after which it
lands (0: during startup, 0–8 s in: imports, data preparation, compile) and a delay of
0–0.3 s (so it also lands inside a step, an eval or an async checkpoint save); the points
of one command are in increasing step order, each in a new attempt. The signal goes to
the run's whole process group, as a scheduler's preemption does. After each fault the same command
is run again, and after the last one it must finish; then every logged metric except
timings (`tokens_per_sec`, `mfu`, `time_*`) must be *bitwise* equal to an uninterrupted
run of the same command (CPU, 8 fake devices, the same compiled executables through a
shared persistent compilation cache). No tolerance was needed: every stage's RNG lives in
the train state and the data position in the checkpoint.

Disk full is emulated with `ulimit -f` (RLIMIT_FSIZE) in the child process, not a tmpfs
(mounting needs root): a write past the limit fails with EFBIG ("File too large") instead
of ENOSPC, through the same error path of the writer.

Parts. The CI part (`python -m pytest`, i.e. not `slow`) tries: pretrain signals (2
points), bad configs of pretrain and the pipeline, every bad-line kind at data
preparation, an empty file, the pickle/eval grep and the crafted pipeline/HF workdirs
(tests/test_pretrain.py already restores past a truncated checkpoint and stops on a NaN in
CI). The `slow` part adds 10 signal points for every command (pretrain, sft, reward, ppo,
dpo, grpo, the pipeline's data → tokenizer → pretrain stages and a sweep of two tiny
pretraining runs; `test_ten_signals_in_the_whole_pipeline` runs every stage of the tiny
pipeline), the
checkpoint damage, the full disk, NaNs (stop and skip), bad configs and bad data through
every stage's command, the 10 MB line, long prompts and crafted stage workdirs.

A row whose *as expected* is below *times* is an observed failure: its test is marked
`xfail(strict=True)` with the expectation unchanged, so fixing the code turns it into an
XPASS that asks for the mark to go.
"""


@pytest.fixture(scope="session", autouse=True)
def fault_results(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """Where every case of this session is recorded (see harness.record)."""
    # FLAXLM_FAULT_RESULTS pools several sessions (e.g. the slow part split over two
    # processes) into one file; the report is written from it by the session that has
    # FLAXLM_WRITE_RELIABILITY=1 set.
    if os.environ.get("FLAXLM_WRITE_RELIABILITY") == "1" and os.environ.get("PYTEST_XDIST_WORKER"):
        pytest.fail("FLAXLM_WRITE_RELIABILITY=1 writes one session's report: run it without -n")
    pooled = os.environ.get("FLAXLM_FAULT_RESULTS")
    path = pathlib.Path(pooled) if pooled else tmp_path_factory.getbasetemp() / "results.jsonl"
    harness.RESULTS["path"] = path
    cache = tmp_path_factory.getbasetemp() / "jax_cache"
    cache.mkdir(exist_ok=True)
    harness.RESULTS["cache"] = cache
    return path


@pytest.fixture(autouse=True)
def fault_suite(request: pytest.FixtureRequest) -> None:
    """Tag the records of a test with the part of the suite it belongs to."""
    harness.SUITE["now"] = "slow" if request.node.get_closest_marker("slow") else "ci"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if os.environ.get("FLAXLM_WRITE_RELIABILITY") != "1" or "path" not in harness.RESULTS:
        return
    results = harness.read_results(harness.RESULTS["path"])
    if not results:
        return
    marks = session.config.getoption("markexpr") or "not slow"
    args = [str(a) for a in session.config.invocation_params.args]
    # Quoted as a shell needs it; the marker expression is named when it was a default.
    note = "" if "-m" in args else f"  # -m {marks!r}"
    command = os.environ.get("FLAXLM_RELIABILITY_COMMAND") or (
        f"FLAXLM_WRITE_RELIABILITY=1 python -m pytest {shlex.join(args)}{note}"
    )
    harness.write_report(
        results,
        harness.ROOT / "docs" / "reliability.md",
        command,
        NOTES,
        time.time() - _STARTED,
    )


def task_pretrain_args(chain: dict, workdir: pathlib.Path, *extra: str) -> list[str]:
    """`flaxlm pretrain` (tiny) on the task's corpus: no TFDS names, no periodic eval,
    every step logged; `extra` adds or overrides keys."""
    return stage_args(
        "pretrain.py",
        workdir,
        chain["tfds"],
        "--config.data.name=",
        "--config.eval.name=",
        f"--config.data.path={chain['paths']['pretrain']}",
        "--config.eval.every_steps=0",
        "--config.log.every_steps=1",
        *extra,
    )


@pytest.fixture(scope="session")
def task_data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Addition task files (corpus, SFT, prompts, ranked) and a TFDS dir; nothing trained."""
    from rlhf import labeler, tasks

    root = tmp_path_factory.mktemp("fault_chain")
    task, rng = tasks.Addition(), np.random.default_rng(0)
    paths = labeler.write_task_data(task, root / "data", rng, 120, 256, 128, n_eval=16)
    ranked = root / "data" / "ranked.jsonl"
    labeler.write_jsonl(ranked, ranked_rows(task, task.prompts(rng, 128), rng))
    paths["ranked"] = str(ranked)
    return {"root": root, "paths": paths, "tfds": root / "tfds"}


@pytest.fixture(scope="session")
def chain(task_data: dict) -> dict:
    """Tiny pretrain → SFT → reward runs (in this process) on the Addition data."""
    from train import pretrain, reward, sft

    root, paths, tfds_dir = task_data["root"], task_data["paths"], task_data["tfds"]
    ranked = paths["ranked"]
    common = ("--config.eval.every_steps=0", "--config.total_steps=10")
    pre, sft_dir, rm_dir = root / "pretrain", root / "sft", root / "reward"
    text = (f"--config.data.path={paths['pretrain']}", "--config.data.name=", "--config.eval.name=")
    assert pretrain.main(stage_args("pretrain.py", pre, tfds_dir, *text, *common)) == 0
    sft_extra = (f"--config.init_from={pre}", f"--config.data.path={paths['sft']}")
    assert sft.main(stage_args("sft.py", sft_dir, tfds_dir, *sft_extra, *common)) == 0
    rm_extra = (
        f"--config.init_from={sft_dir}",
        f"--config.data.path={ranked}",
        f"--config.calibration.prompts_path={paths['eval_prompts']}",
    )
    assert reward.main(stage_args("reward.py", rm_dir, tfds_dir, *rm_extra, *common)) == 0
    return {
        "root": root,
        "paths": paths,
        "pretrain": pre,
        "sft": sft_dir,
        "reward": rm_dir,
        "tfds": tfds_dir,
    }
