"""SIGTERM, SIGINT and kill -9 at seeded points of every training command, each followed
by the same command again: the run completes and its metrics equal, bitwise, those of an
uninterrupted run. CI: 2 points per command; `slow`: 10 per command (the pipeline: the
whole tiny pipeline against the session's `tiny_pipeline`)."""

from __future__ import annotations

import contextlib
import dataclasses
import filecmp
import json
import os
import pathlib
import signal
import time
from collections.abc import Callable

import pytest

from tests.faults import harness
from tests.faults.conftest import stage_args

PIPELINE = str(harness.CONFIGS / "pipeline.py")


@dataclasses.dataclass(frozen=True)
class Command:
    """How to run one command in a workdir, and what to compare afterwards."""

    name: str
    args: Callable[[dict, pathlib.Path], list[str]]
    total_steps: int  # the progress range the points are drawn from
    metrics: tuple[str, ...] = ("metrics.jsonl",)  # relative to the workdir
    files: tuple[str, ...] = ()  # compared too (JSON without timings, else bytes)


def _log1(*extra: str) -> tuple[str, ...]:
    return ("--config.log.every_steps=1", *extra)


COMMANDS = {
    "pretrain": Command(
        "pretrain",
        lambda c, w: stage_args(
            "pretrain.py",
            w,
            w.parent / (w.name + "_tfds"),  # its own: faults may land in data preparation
            "--config.data.name=",
            "--config.eval.name=",
            f"--config.data.path={c['paths']['pretrain']}",
            f"--config.eval.path={c['paths']['pretrain']}",
            "--config.eval.split=train",
            "--config.eval.every_steps=8",
            "--config.eval.max_batches=1",
            "--config.total_steps=16",
            "--config.checkpoint.every_steps=4",
            *_log1(),
        ),
        16,
    ),
    "sft": Command(
        "sft",
        lambda c, w: stage_args(
            "sft.py",
            w,
            c["tfds"],
            f"--config.init_from={c['pretrain']}",
            f"--config.data.path={c['paths']['sft']}",
            f"--config.eval.path={c['paths']['sft_eval']}",
            "--config.eval.every_steps=6",
            "--config.eval.num_samples=0",
            "--config.total_steps=12",
            "--config.checkpoint.every_steps=3",
            *_log1(),
        ),
        12,
    ),
    "reward": Command(
        "reward",
        lambda c, w: stage_args(
            "reward.py",
            w,
            c["tfds"],
            f"--config.init_from={c['sft']}",
            f"--config.data.path={c['paths']['ranked']}",
            f"--config.calibration.prompts_path={c['paths']['eval_prompts']}",
            "--config.eval.every_steps=0",
            "--config.total_steps=12",
            "--config.checkpoint.every_steps=3",
            *_log1(),
        ),
        12,
        files=("reward_calibration.json",),
    ),
    "ppo": Command(
        "ppo",
        lambda c, w: stage_args(
            "ppo.py",
            w,
            c["tfds"],
            f"--config.init_from={c['sft']}",
            f"--config.reward_from={c['reward']}",
            f"--config.data.path={c['paths']['prompts']}",
            "--config.task=addition",
            "--config.total_steps=6",
            "--config.checkpoint.every_steps=2",
            *_log1(),
        ),
        6,
    ),
    "dpo": Command(
        "dpo",
        lambda c, w: stage_args(
            "dpo.py",
            w,
            c["tfds"],
            f"--config.init_from={c['sft']}",
            f"--config.data.path={c['paths']['ranked']}",
            "--config.total_steps=8",
            "--config.checkpoint.every_steps=2",
            *_log1(),
        ),
        8,
    ),
    "grpo": Command(
        "grpo",
        lambda c, w: stage_args(
            "grpo.py",
            w,
            c["tfds"],
            f"--config.init_from={c['sft']}",
            f"--config.reward_from={c['reward']}",
            f"--config.data.path={c['paths']['prompts']}",
            "--config.task=addition",
            "--config.total_steps=4",
            "--config.checkpoint.every_steps=1",
            *_log1(),
        ),
        4,
    ),
    # CI: the first three stages of the tiny pipeline (data files, tokenizer, pretrain).
    "pipeline": Command(
        "pipeline",
        lambda c, w: [
            "--config",
            f"{PIPELINE}:tiny",
            "--workdir",
            str(w),
            "--stages",
            "data,tokenizer,pretrain",
            "--config.pretrain.total_steps=12",
            "--config.pretrain.optim.warmup_steps=2",
            "--config.pretrain.checkpoint.every_steps=4",
            "--config.pretrain.log.every_steps=1",
        ],
        12,
        metrics=("pretrain/metrics.jsonl",),
        files=(
            "data/pretrain.txt",
            "data/sft.jsonl",
            "data/prompts.jsonl",
            "data/eval_prompts.jsonl",
            "tokenizer/tokenizer.model",
        ),
    ),
}


def sweep_args(chain: dict, workdir: pathlib.Path) -> list[str]:
    """A sweep of one arm x 2 seeds of tiny pretraining on the task text; its ablation file
    is written beside the workdir."""
    ablation = workdir.parent / f"{workdir.name}_ablation.py"
    spec = {
        "command": "pretrain",
        "config": f"{harness.CONFIGS / 'pretrain.py'}:tiny",
        "overrides": {
            "data.name": "",
            "eval.name": "",
            "data.path": str(chain["paths"]["pretrain"]),
            "data.data_dir": str(workdir.parent / f"{workdir.name}_tfds"),
            "eval.every_steps": 0,
            "total_steps": 8,
            "checkpoint.every_steps": 2,
            "log.every_steps": 1,
        },
        "arms": {"base": {}},
        "seeds": [0, 1],
        "metrics": ["final_loss"],
    }
    ablation.write_text(f"def get_ablation(arg=None):\n    return {spec!r}\n")
    return ["--config", str(ablation), "--workdir", str(workdir)]


COMMANDS["sweep"] = Command(
    "sweep",
    sweep_args,
    16,
    metrics=tuple(f"runs/base/seed{s}/metrics.jsonl" for s in (0, 1)),
)

# The whole tiny pipeline (slow): progress = the training steps of its stages in order.
FULL_PIPELINE = Command(
    "pipeline",
    lambda c, w: ["--config", f"{PIPELINE}:tiny", "--workdir", str(w)],
    20 + 10 + 10 + 4,
    metrics=tuple(f"{s}/metrics.jsonl" for s in ("pretrain", "sft", "reward", "ppo")),
    files=(
        "data/pretrain.txt",
        "data/sft.jsonl",
        "data/prompts.jsonl",
        "rm_data/ranked.jsonl",
        "rm_data/ranked_eval.jsonl",
        "reward/reward_calibration.json",
        "summary.json",
    ),
)

_REFERENCES: dict[str, pathlib.Path] = {}


def reference(command: Command, chain: dict, root: pathlib.Path) -> pathlib.Path:
    """One uninterrupted run per command and session."""
    if command.name not in _REFERENCES:
        workdir = root / f"reference_{command.name}"
        log = workdir.parent / f"reference_{command.name}.log"
        code = harness.run(command.name, command.args(chain, workdir), log)
        assert code == 0, harness.tail(log)
        _REFERENCES[command.name] = workdir
    return _REFERENCES[command.name]


def compare(command: Command, expected: pathlib.Path, got: pathlib.Path) -> list[str]:
    problems = []
    for rel in command.metrics:
        problems += harness.diff_tables(
            harness.metric_table(expected / rel), harness.metric_table(got / rel), rel
        )
    for rel in command.files:
        a, b = expected / rel, got / rel
        if not b.exists():
            problems.append(f"{rel}: missing after recovery")
        elif rel.endswith(".json"):
            # Paths into the run's own workdir (e.g. the calibrated checkpoint) differ by name.
            ja, jb = (
                harness.without_timings(json.loads(p.read_text().replace(str(w), "<workdir>")))
                for p, w in ((a, expected), (b, got))
            )
            if ja != jb:
                keys = sorted(k for k in set(ja) | set(jb) if ja.get(k) != jb.get(k))
                problems.append(f"{rel}: differs in {keys[:6]}")
        elif not filecmp.cmp(a, b, shallow=False):
            problems.append(f"{rel}: bytes differ")
    return problems


def progress(workdir: pathlib.Path, command: Command, since: float) -> int:
    """Training steps logged so far over the command's metrics files (-1 until one of
    them is written by this attempt)."""
    total, fresh = 0, False
    for rel in command.metrics:
        path = workdir / rel
        step = harness.logged_step(path, 0.0)
        total += max(step, 0)
        fresh = fresh or harness.logged_step(path, since) >= 0
    return total if fresh else -1


def attempt(
    command: Command,
    args: list[str],
    workdir: pathlib.Path,
    point: harness.Point,
    log: pathlib.Path,
) -> tuple[bool, int]:
    """One run of the command with `point` injected: (injected, exit code)."""
    proc = harness.start(command.name, args, log)
    started = time.time() - 0.01
    deadline = time.monotonic() + 600
    if point.after_step > 0:
        while proc.poll() is None and time.monotonic() < deadline:
            if progress(workdir, command, started) >= point.after_step:
                break
            time.sleep(0.05)
    time.sleep(point.delay)
    injected = proc.poll() is None
    if injected:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, point.signum)
    return injected, harness.finish(proc)


def fault_chain(
    command: Command,
    expected: pathlib.Path,
    workdir: pathlib.Path,
    chain: dict,
    faults: list[harness.Point],
    suite: str,
) -> None:
    """Inject each point into a new attempt of the same command; when an attempt completes
    the run before its point, that workdir is finished and checked and the remaining points
    go to a fresh workdir. Each workdir is rerun to completion and compared with the
    uninterrupted run; every injected point is recorded with its workdir's verdict."""
    pending, problems, rounds = list(faults), [], 0
    expectation = "the rerun completes; metrics bitwise equal to an uninterrupted run"
    while pending:
        wd = workdir if rounds == 0 else workdir.with_name(f"{workdir.name}_{rounds}")
        log = wd.parent / f"{wd.name}.log"
        args = command.args(chain, wd)
        seen: list[tuple[harness.Point, str]] = []
        while pending:
            injected, code = attempt(command, args, wd, pending[0], log)
            if not injected and code == 0 and seen:
                break  # the run is complete: the rest go to a fresh workdir
            point = pending.pop(0)
            if not injected and code != 0:
                found_early = f"an attempt exited {code} with no signal sent"
                problems.append(found_early)
                continue
            if not injected:
                continue  # the point lies beyond a whole run: not a fault
            if code == 128 + point.signum:
                what = f"checkpointed, exit {code}"
            elif code == 0:
                what = "exit 0 (it landed after the last step)"
            else:
                what = f"exit {code}"
            seen.append((point, what))
        code = harness.run(command.name, args, log)
        found = [f"the final rerun exited {code}: {harness.tail(log, 400)}"] if code else []
        found = found or compare(command, expected, wd)
        for point, what in seen:
            kind = signal.Signals(point.signum).name.replace("SIGKILL", "kill -9")
            with (
                contextlib.suppress(AssertionError),
                harness.case(
                    "signals", command.name, kind, point.describe(), expectation, suite
                ) as info,
            ):
                info["detail"] = what
                assert not found, "; ".join(found[:3])
        problems += found
        rounds += 1
    assert not problems, "\n".join(problems[:20])


SEEDS = {name: i for i, name in enumerate(COMMANDS)}
CI_COMMANDS = ("pretrain",)
# Points per command in the slow part; FLAXLM_FAULT_POINTS lowers it when time is short
# (docs/reliability.md then says so in its header).
SLOW_POINTS = int(
    os.environ.get("FLAXLM_FAULT_POINTS", "10")
)  # the CI budget (~120 s on 2 idle cores) holds one command


def links(name: str, request: pytest.FixtureRequest) -> dict:
    """Pretraining and the pipeline need only the task files; the rest the trained chain."""
    fixture = "task_data" if name in ("pretrain", "pipeline", "sweep") else "chain"
    return request.getfixturevalue(fixture)


@pytest.mark.parametrize("name", CI_COMMANDS)
def test_two_signals_then_rerun_matches(name, request, tmp_path, tmp_path_factory):
    command, chain = COMMANDS[name], links(name, request)
    expected = reference(command, chain, tmp_path_factory.getbasetemp())
    faults = harness.points(100 + SEEDS[name], 2, command.total_steps)
    fault_chain(command, expected, tmp_path / name, chain, faults, "ci")


@pytest.mark.slow
@pytest.mark.parametrize("name", list(COMMANDS))
def test_ten_signals_then_rerun_matches(name, request, tmp_path, tmp_path_factory):
    command, chain = COMMANDS[name], links(name, request)
    expected = reference(command, chain, tmp_path_factory.getbasetemp())
    faults = harness.points(200 + SEEDS[name], SLOW_POINTS, command.total_steps)
    fault_chain(command, expected, tmp_path / name, chain, faults, "slow")


@pytest.mark.slow
def test_ten_signals_in_the_whole_pipeline(task_data, tiny_pipeline, tmp_path):
    """Every stage of the tiny pipeline, against the session's uninterrupted one."""
    faults = harness.points(300, 10, FULL_PIPELINE.total_steps)
    fault_chain(FULL_PIPELINE, tiny_pipeline, tmp_path / "pipeline", task_data, faults, "slow")
