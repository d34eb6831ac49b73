"""`flaxlm sweep --config configs/ablations/NAME.py[:ARG] --workdir DIR [--shard I/N]`.

An ablation file defines `get_ablation(arg=None)` returning a plain dict:

    command    the flaxlm command every run executes ("pretrain", "reward", "pipeline", ...)
    config     its base config, "configs/FILE.py:PRESET"
    overrides  {key: value} for every run (optional), e.g. {"total_steps": 300}
    arms       {arm: {key: value}}, or instead
    factors    {factor: {level: {key: value}}}: the arms are the product, named "a+b"
    seeds      [0, 1, 2]
    runs       optional explicit [[arm, seed], ...] instead of arms x seeds
    baseline   the arm paired differences are taken against (default: the first)
    metrics, curves, frontier   what `flaxlm report` shows (orchestrate/report.py)
    seed_keys  config keys set to the seed (default ["seed"])

Pairing: the run of seed S sets every seed key to S in every arm. In pretraining (and every
stage) `seed` drives both the initialization and the data shuffle, so all arms of one seed
index start from the same init seed and read the same batches, unless an arm changes the
data itself (data.*, batch_size, seq_len): the sweep warns about those arms.

Each run is a subprocess (`python -m orchestrate.cli COMMAND ...`) in DIR/runs/ARM/seedS, with
its log in run.log and its outcome in sweep_run.json: a crash is recorded and the sweep goes
on, then exits 1 naming the failed runs. Rerunning the sweep skips finished runs (a run
interrupted midway resumes from its checkpoint, as any stage does). SIGTERM or SIGINT to
the sweep's process group (a preemption, Ctrl-C) lets the current run checkpoint and exit;
the sweep records it as interrupted and exits 128 + signal without starting the next run.
A signal to the sweep's process alone lets the current run finish first. `--shard I/N` runs
every N-th run starting at I (runs are ordered seed-major, so early seeds complete first);
each host writes the same sweep.json and its own runs, e.g. onto a shared filesystem.
At the end the report (orchestrate/report.py) is written to DIR/report.md unless --no-report.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import itertools
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from configs import loader
from orchestrate.jsonio import read_json, write_json_atomic
from orchestrate.sweep_files import PLAN_FILE, RUN_FILE
from train.signals import SignalFlag

ROOT = pathlib.Path(__file__).resolve().parents[1]  # the repository (train/, configs/, ...)
LOG_FILE = "run.log"
KNOWN_KEYS = {
    "command",
    "config",
    "overrides",
    "arms",
    "factors",
    "seeds",
    "runs",
    "baseline",
    "metrics",
    "curves",
    "frontier",
    "seed_keys",
    "description",
}
DATA_KEY_PARTS = ("data", "batch_size", "seq_len")  # keys that change what a run reads


class SweepInterrupted(SystemExit):
    """SIGTERM/SIGINT reached the sweep: the current run checkpointed and exited (exit
    code 128 + signal, as a stage's)."""

    def __init__(self, signum: int, run: str):
        super().__init__(128 + signum)
        self.signum, self.run = signum, run


class SweepError(ValueError):
    """A bad ablation file or sweep option: one line, exit 2, nothing run."""


@dataclasses.dataclass(frozen=True)
class Run:
    arm: str
    seed: int
    overrides: dict[str, Any]  # every --config override of this run, in order

    @property
    def name(self) -> str:
        return f"{self.arm}/seed{self.seed}"


@dataclasses.dataclass(frozen=True)
class Plan:
    command: str
    config: str
    arms: dict[str, dict[str, Any]]
    seeds: list[int]
    runs: list[Run]
    baseline: str
    spec: dict[str, Any]  # the ablation dict as given (report settings live here)


def load_ablation(spec: str) -> dict[str, Any]:
    """`file.py` or `file.py:ARG` -> get_ablation(ARG)."""
    path, _, arg = spec.partition(":")
    file = pathlib.Path(path)
    if not file.is_file():
        raise SweepError(f"--config: no such file {path!r}")
    module_spec = importlib.util.spec_from_file_location(f"_flaxlm_ablation_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_ablation"):
        raise SweepError(f"--config: {path} defines no get_ablation(arg)")
    return module.get_ablation(arg or None)


def expand_arms(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Explicit `arms`, or the product of `factors` (levels joined by '+')."""
    if ("arms" in spec) == ("factors" in spec):
        raise SweepError("the ablation must give exactly one of 'arms' and 'factors'")
    if "arms" in spec:
        arms = {str(k): dict(v) for k, v in spec["arms"].items()}
    else:
        levels = [list(levels.items()) for levels in spec["factors"].values()]
        arms = {}
        for combo in itertools.product(*levels):
            merged: dict[str, Any] = {}
            for _, overrides in combo:
                merged.update(overrides)
            arms["+".join(str(name) for name, _ in combo)] = merged
    if not arms:
        raise SweepError("the ablation has no arms")
    for arm in arms:
        if not arm or "/" in arm or arm.startswith("."):
            raise SweepError(f"arm name {arm!r}: must be a plain directory name")
    return arms


def make_plan(spec: dict[str, Any], cli_overrides: Sequence[str] = ()) -> Plan:
    """Validate an ablation dict and list its runs (seed-major: all arms of seed 0 first)."""
    unknown = set(spec) - KNOWN_KEYS
    if unknown:
        raise SweepError(f"unknown ablation key(s) {sorted(unknown)}; known: {sorted(KNOWN_KEYS)}")
    for key in ("command", "config", "seeds"):
        if key not in spec:
            raise SweepError(f"the ablation has no {key!r}")
    arms = expand_arms(spec)
    seeds = [int(s) for s in spec["seeds"]]
    if not seeds or len(set(seeds)) != len(seeds):
        raise SweepError(f"seeds={spec['seeds']}: give distinct seeds")
    seed_keys = list(spec.get("seed_keys", ["seed"]))
    cli = dict(item.split("=", 1) for item in cli_overrides)
    if set(cli) & set(seed_keys):
        raise SweepError(f"--config.{sorted(set(cli) & set(seed_keys))[0]}: use --seeds instead")
    for arm, overrides in arms.items():
        clash = sorted((set(overrides) & set(seed_keys)) | (set(overrides) & set(cli)))
        if clash:
            raise SweepError(f"arm {arm!r} sets {clash}: seeds and --config overrides are shared")
    pairs = spec.get("runs") or [[arm, seed] for seed in seeds for arm in arms]
    runs = []
    for arm, seed in pairs:
        if arm not in arms:
            raise SweepError(f"runs: unknown arm {arm!r}; arms are {sorted(arms)}")
        overrides = {**spec.get("overrides", {}), **cli, **arms[arm]}
        overrides.update({key: int(seed) for key in seed_keys})
        runs.append(Run(str(arm), int(seed), overrides))
    baseline = str(spec.get("baseline", next(iter(arms))))
    if baseline not in arms:
        raise SweepError(f"baseline {baseline!r} is not an arm; arms are {sorted(arms)}")
    return Plan(spec["command"], resolve_config(spec["config"]), arms, seeds, runs, baseline, spec)


def resolve_config(spec: str) -> str:
    """A config path as given if it exists from here, else from the repository root (so a
    sweep launched outside the checkout still finds configs/...)."""
    path, sep, arg = spec.partition(":")
    if pathlib.Path(path).is_file() or not (ROOT / path).is_file():
        return spec
    return f"{ROOT / path}{sep}{arg}"


def unpaired_arms(arms: dict[str, dict[str, Any]]) -> list[str]:
    """Arms whose overrides change the data a run reads (so not the same batches)."""

    def touches_data(key: str) -> bool:
        return any(part in DATA_KEY_PARTS for part in key.split("."))

    return [arm for arm, overrides in arms.items() if any(map(touches_data, overrides))]


def format_value(value: Any) -> str:
    """A Python value as the text `--config.KEY=TEXT` parses back to it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value)
    return str(value)


def run_args(plan: Plan, run: Run, workdir: pathlib.Path) -> list[str]:
    """The flaxlm arguments of one run (after `flaxlm`)."""
    args = [plan.command, "--config", plan.config, "--workdir", str(run_dir(workdir, run))]
    return args + [f"--config.{k}={format_value(v)}" for k, v in run.overrides.items()]


def run_dir(workdir: pathlib.Path, run: Run) -> pathlib.Path:
    return workdir / "runs" / run.arm / f"seed{run.seed}"


def parse_shard(text: str) -> tuple[int, int]:
    index, sep, count = text.partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        raise SweepError(f"--shard {text!r}: expected I/N, e.g. 0/4") from None
    if not sep or n < 1 or not 0 <= i < n:
        raise SweepError(f"--shard {text!r}: need 0 <= I < N")
    return i, n


def shard_runs(runs: Sequence[Run], index: int, count: int) -> list[Run]:
    return [run for j, run in enumerate(runs) if j % count == index]


def is_finished(directory: pathlib.Path, args: list[str]) -> bool:
    """Finished with these exact arguments; finished with others is an error, not a skip."""
    record = read_json(directory / RUN_FILE)
    if not record or record.get("status") != "finished":
        return False
    if record.get("args") != args:
        raise SweepError(
            f"{directory} finished with other settings (the ablation or --config overrides "
            "changed since); use a new --workdir or the original settings"
        )
    return True


def subprocess_runner(args: list[str], directory: pathlib.Path) -> int:
    """Run `python -m orchestrate.cli ARGS` with fresh JAX state; output appended to run.log."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / LOG_FILE).open("a") as log:
        log.write(f"$ flaxlm {' '.join(args)}\n")
        log.flush()
        proc = subprocess.Popen(
            [sys.executable, "-m", "orchestrate.cli", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        return proc.wait()


def log_tail(directory: pathlib.Path, lines: int = 5) -> str:
    try:
        text = (directory / LOG_FILE).read_text(errors="replace")
    except FileNotFoundError:
        return ""
    # tqdm redraws with carriage returns: keep what the last redraw shows.
    shown = [line.split("\r")[-1] for line in text.splitlines() if line.strip()]
    return "\n".join("    " + line for line in shown[-lines:])


def execute(
    plan: Plan,
    workdir: pathlib.Path,
    runs: Sequence[Run],
    runner: Callable[[list[str], pathlib.Path], int] = subprocess_runner,
    echo: Callable[[str], None] = print,
) -> list[str]:
    """Run what is not finished, one at a time; returns the names of failed runs. A
    SIGTERM/SIGINT lets the current run checkpoint and exit, records it as interrupted
    (not failed) and raises SweepInterrupted before the next run starts."""
    # Checked for every run first: a changed ablation is refused before anything runs.
    done = [is_finished(run_dir(workdir, run), run_args(plan, run, workdir)) for run in runs]
    failed = []
    with SignalFlag() as stop:
        for i, run in enumerate(runs, 1):
            directory = run_dir(workdir, run)
            args = run_args(plan, run, workdir)
            prefix = f"[{i}/{len(runs)}] {run.name}"
            if done[i - 1]:
                echo(f"{prefix}: finished earlier, skipped")
                continue
            if stop.signum:  # it arrived after the previous run had finished
                raise SweepInterrupted(stop.signum, run.name)
            previous = read_json(directory / RUN_FILE) or {}
            echo(f"{prefix}: running (log {directory / LOG_FILE})")
            start = time.perf_counter()
            code = runner(args, directory)
            wall = time.perf_counter() - start
            status = "finished" if code == 0 else "interrupted" if stop.signum else "failed"
            record = {
                "arm": run.arm,
                "seed": run.seed,
                "args": args,
                "status": status,
                "returncode": code,
                # Failed or interrupted attempts count: the run's total time to finish.
                "wall_s": previous.get("wall_s", 0.0) + wall,
                "attempts": previous.get("attempts", 0) + 1,
            }
            write_json_atomic(directory / RUN_FILE, record)
            if status == "finished":
                echo(f"{prefix}: finished in {wall:.1f} s")
            elif status == "interrupted":
                raise SweepInterrupted(stop.signum, run.name)
            else:
                failed.append(run.name)
                echo(f"{prefix}: FAILED (exit {code}) in {wall:.1f} s\n{log_tail(directory)}")
    return failed


def plan_record(plan: Plan) -> dict[str, Any]:
    """sweep.json: what `flaxlm report` needs to read the runs back."""
    return {
        "command": plan.command,
        "config": plan.config,
        "arms": plan.arms,
        "seeds": plan.seeds,
        "baseline": plan.baseline,
        "runs": [
            {"arm": r.arm, "seed": r.seed, "dir": f"runs/{r.arm}/seed{r.seed}"} for r in plan.runs
        ],
        "spec": plan.spec,
    }


def main(argv: Sequence[str]) -> int:
    try:
        rest, overrides = loader.split_argv(argv)
    except loader.ConfigError as err:
        print(f"flaxlm sweep: error: {err}", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(
        prog="flaxlm sweep",
        description="run an ablation's arms x seeds (paired), then write the report; "
        "--config.KEY=VALUE applies to every run",
    )
    parser.add_argument("--config", required=True, help="configs/ablations/NAME.py[:ARG]")
    parser.add_argument("--workdir", required=True, help="sweep directory (resumes if present)")
    parser.add_argument("--shard", default="0/1", help="I/N: run every N-th run from I")
    parser.add_argument("--seeds", default="", help="comma-separated seeds replacing the file's")
    parser.add_argument("--dry-run", action="store_true", help="print the runs, run nothing")
    parser.add_argument("--no-report", action="store_true", help="skip the report at the end")
    args = parser.parse_args(rest)
    workdir = pathlib.Path(args.workdir)
    try:
        spec = load_ablation(args.config)
        if args.seeds:
            spec = {**spec, "seeds": [int(s) for s in args.seeds.split(",")], "runs": None}
        plan = make_plan(spec, overrides)
        index, count = parse_shard(args.shard)
    except (SweepError, ValueError, TypeError, KeyError) as err:
        print(f"flaxlm sweep: error: {err}", file=sys.stderr)
        return 2
    runs = shard_runs(plan.runs, index, count)
    for arm in unpaired_arms(plan.arms):
        print(f"flaxlm sweep: warning: arm {arm!r} changes the data; not paired", file=sys.stderr)
    if args.dry_run:
        for run in runs:
            print(f"{run.name}: flaxlm {' '.join(run_args(plan, run, workdir))}")
        return 0
    write_json_atomic(workdir / PLAN_FILE, plan_record(plan))
    try:
        failed = execute(plan, workdir, runs)
    except SweepError as err:
        print(f"flaxlm sweep: error: {err}", file=sys.stderr)
        return 2
    except SweepInterrupted as stop:
        print(
            f"flaxlm sweep: {signal.Signals(stop.signum).name} during {stop.run}: stopped; "
            "rerun the same command to resume",
            file=sys.stderr,
        )
        return 128 + stop.signum
    if not args.no_report:
        from orchestrate import report  # matplotlib and friends: only when there is a report

        report.main([str(workdir)])
    if failed:
        print(f"flaxlm sweep: {len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
