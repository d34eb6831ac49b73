"""A full disk during a checkpoint save. Emulated with `ulimit -f` (RLIMIT_FSIZE) in the
child: mounting a size-limited tmpfs needs root. Python ignores SIGXFSZ, so a write past
the limit fails with EFBIG ("File too large") through the same error path as ENOSPC.

Expectation: the run stops with a clear error (non-zero exit, no silent success), the
previous checkpoint is intact, and rerunning with space resumes from it and matches an
uninterrupted run."""

from __future__ import annotations

import pathlib
import shlex
import shutil
import subprocess

import pytest

from tests.faults import harness
from tests.faults.conftest import task_pretrain_args

LIMIT_KB = 48  # above every small file (metrics, JSON, tokenizer), below the array data


def pretrain_args(chain: dict, workdir: pathlib.Path, *extra: str) -> list[str]:
    return task_pretrain_args(
        chain, workdir, "--config.checkpoint.every_steps=4", "--config.total_steps=8", *extra
    )


@pytest.mark.slow
def test_disk_full_during_save_keeps_the_previous_checkpoint(task_data, tmp_path):
    chain = task_data
    root = tmp_path
    straight, workdir = root / "straight", root / "run"
    for name, extra in (("straight", ()), ("run", ("--config.stop_at_step=4",))):
        log = root / f"{name}.log"
        code = harness.run("pretrain", pretrain_args(chain, root / name, *extra), log)
        assert code == 0, harness.tail(log)
    before = sorted(p.name for p in (workdir / "checkpoints").iterdir())
    expect = "clear error, non-zero exit; previous checkpoint intact; rerun resumes and matches"
    with harness.case(
        "disk",
        "pretrain",
        "file size limit (ulimit -f) during a save",
        "checkpoint at step 8",
        expect,
    ) as info:
        # No compilation cache: its writes would hit the limit first.
        env = harness.child_env(None)
        cmd = shlex.join(harness.cli_argv("pretrain", *pretrain_args(chain, workdir)))
        result = subprocess.run(
            ["bash", "-c", f"ulimit -f {LIMIT_KB}; exec {cmd}"],
            cwd=harness.ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        err = result.stderr.strip()
        last = err.splitlines()[-1][-200:] if err else "(silent)"
        tb = "with a traceback" if "Traceback" in err else "no traceback"
        info["detail"] = f"exit {result.returncode} ({tb}): {last}"
        assert result.returncode != 0, "reported success with a failed save"
        assert "File too large" in err or "No space" in err or "EFBIG" in err, last
        steps = sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
        assert "4" in steps, f"previous checkpoint gone: {steps} (before: {before})"
        log = root / "rerun.log"
        code = harness.run("pretrain", pretrain_args(chain, workdir), log)
        assert code == 0, harness.tail(log)
        assert "resuming from checkpoint step 4" in harness.tail(log, 20000)
        problems = harness.diff_tables(
            harness.metric_table(straight / "metrics.jsonl"),
            harness.metric_table(workdir / "metrics.jsonl"),
            "metrics",
        )
        assert not problems, "; ".join(problems[:3])
        assert "Traceback" not in err, "the error is a traceback, not one clear line"
    shutil.rmtree(root / "straight", ignore_errors=True)
