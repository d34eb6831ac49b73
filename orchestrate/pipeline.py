"""`flaxlm pipeline --config configs/pipeline.py:demo --workdir DIR [--stages A,B] [--from-stage S]`

Runs the stages of configs/pipeline.py in order, each in DIR/<stage>/, each later stage
initialized from the earlier ones (the checkpoints record the lineage). DIR/config.json is
the resolved pipeline config; DIR/pipeline.json records which stages finished, when and in
how many seconds.

Resuming. Rerunning the command skips finished stages and resumes the interrupted one
from its own checkpoint (training stages are exactly resumable; the data stages write
their files atomically and are redone from their seed). A finished stage whose part of
the config has changed since is refused by name (`--from-stage` reruns it); the report
is rebuilt whenever it is selected.
`--stages` runs a subset (a stage whose inputs have not been produced is refused);
`--from-stage S` reruns S and every later selected stage, keeping what came before: the
outputs it replaces are moved to DIR/replaced/<stage>-<time>/, never deleted.

Stages run in this process, one after another, on the mesh of their own config.
Single host: the pipeline's own files are written by process 0 only, but it has not been
tested on several hosts.
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import sys
import time
from collections.abc import Sequence
from typing import Any

import ml_collections

from configs import loader, stages
from configs.pipeline import ALL_STAGES
from orchestrate import pipeline_sizing
from orchestrate.jsonio import write_json_atomic
from orchestrate.workdir import STATE_FILE, read_state

# The config sections each stage depends on (besides `task` and `seed`, which all do), and
# what it reads from earlier stages: configs/stages.py.
STAGE_KEYS = {s.name: s.sections or (s.name,) for s in stages.STAGES}
NEEDS = {s.name: s.needs for s in stages.STAGES}
# With a base model (`init_from`) there is no tokenizer or pretraining stage, and SFT is
# optional: the stages that read the SFT policy read the base model when SFT did not run.
NEEDS_WITH_BASE = {"sft": ("data",), "rm_data": ("data",), "report": ("data",)}
BASE_MAKES = ("tokenizer", "pretrain")  # what a base model brings instead
BEFORE_SIZING = ("data", "tokenizer")  # the stages that run before lengths can be measured


class PipelineError(ValueError):
    """Bad arguments or a workdir the requested stages cannot continue: one line, exit 2."""


# ----------------------------------------------------------------------------- bookkeeping


def stage_fingerprint(config: ml_collections.ConfigDict, stage: str) -> dict[str, Any]:
    """The part of the config a stage's outputs depend on."""
    keys = ("task", "seed", "init_from", "size_to_data", *STAGE_KEYS[stage])
    return {k: (config[k].to_dict() if hasattr(config[k], "to_dict") else config[k]) for k in keys}


# Stage-config keys added after pipelines may have recorded their fingerprints, each with
# the value that reproduces the behaviour from before it existed. A recorded fingerprint
# lacking one is read as having that value, so upgrading flaxlm does not refuse a
# finished stage over a setting it never had.
# (size_to_data: the demo's tasks fit its preset lengths, so sizing changes nothing there.)
ADDED_KEYS = {"optim.ns_steps": 5, "labeler.kind": "simulated", "init_from": ""}
ADDED_KEYS |= {"size_to_data": True}


def with_added_keys(recorded: Any, current: Any, prefix: str = "") -> Any:
    """`recorded` with each ADDED_KEYS key it lacks (but `current` has) filled in."""
    if not (isinstance(recorded, dict) and isinstance(current, dict)):
        return recorded
    out = dict(recorded)
    for key, value in current.items():
        dotted = f"{prefix}{key}"
        if key in recorded:
            out[key] = with_added_keys(recorded[key], value, dotted + ".")
        else:
            added = [v for k, v in ADDED_KEYS.items() if dotted == k or dotted.endswith("." + k)]
            if added:
                out[key] = added[0]
    return out


def changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += changed_keys(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [prefix.rstrip(".")]


def select_stages(config: ml_collections.ConfigDict, stages: str | None) -> list[str]:
    """The stages to run, in pipeline order; unknown names are refused by name. With a
    base model (`init_from`) the tokenizer and pretrain stages of `config.stages` are
    left out; asking for them with --stages is an error."""
    names = [s.strip() for s in (stages or config.stages).split(",") if s.strip()]
    unknown = [s for s in names if s not in ALL_STAGES]
    if unknown:
        raise PipelineError(f"unknown stage(s) {unknown}; choose from {list(ALL_STAGES)}")
    if config.get("needs_init_from") and not config.init_from:
        raise PipelineError(
            "this preset starts from a base model: pass --config.init_from=DIR, a run "
            "directory of flaxlm import-gguf or import-hf (README, 'Start from a real model')"
        )
    if config.init_from:
        clash = [s for s in names if s in BASE_MAKES]
        if clash and stages:
            raise PipelineError(
                f"--stages {','.join(clash)} with init_from={config.init_from}: the base "
                "model brings its own tokenizer and weights; leave them out"
            )
        names = [s for s in names if s not in BASE_MAKES]
    if not names:
        raise PipelineError("no stages selected")
    return [s for s in ALL_STAGES if s in names]


def stage_needs(config: ml_collections.ConfigDict, stage: str) -> tuple[str, ...]:
    return NEEDS_WITH_BASE.get(stage, NEEDS[stage]) if config.init_from else NEEDS[stage]


def plan(
    config: ml_collections.ConfigDict,
    selected: list[str],
    state: dict[str, Any],
    from_stage: str | None,
) -> tuple[list[str], list[str]]:
    """(stages to run, stages to reset first), or a PipelineError naming the problem."""
    done = {s for s, info in state["stages"].items() if info.get("done")}
    reset: list[str] = []
    if from_stage:
        if from_stage not in selected:
            raise PipelineError(f"--from-stage {from_stage} is not among the selected stages")
        reset = selected[selected.index(from_stage) :]
        done -= set(reset)
    to_run = [s for s in selected if s not in done or s == "report"]
    for stage in selected:
        if stage in done and stage != "report":
            current = stage_fingerprint(config, stage)
            recorded = with_added_keys(state["stages"][stage].get("config"), current)
            diff = changed_keys(recorded, current)
            if diff:
                raise PipelineError(
                    f"stage {stage} finished with another config ({', '.join(diff[:5])} "
                    f"changed); rerun it with --from-stage {stage}"
                )
    available = done | set(to_run)
    for stage in to_run:
        missing = [n for n in stage_needs(config, stage) if n not in available]
        if missing:
            raise PipelineError(
                f"stage {stage} needs {', '.join(missing)}, which has not run in this "
                "workdir; add it to --stages"
            )
    return to_run, reset


def move_aside(workdir: pathlib.Path, stage: str) -> None:
    """Keep a replaced stage's outputs under DIR/replaced/ (nothing is deleted)."""
    source = workdir / stage if stage != "report" else workdir / "report"
    if source.exists():
        target = workdir / "replaced" / f"{stage}-{time.strftime('%Y%m%d-%H%M%S')}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(source), str(target))
        print(f"pipeline: moved the old {stage} outputs to {target}", file=sys.stderr)


# ----------------------------------------------------------------------------- the command


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, ml_collections.ConfigDict]:
    rest, overrides = loader.split_argv(argv)
    parser = argparse.ArgumentParser(
        prog="flaxlm pipeline",
        description="run every stage, tokenizer to RLHF, in one workdir (resumable)",
    )
    parser.add_argument("--config", required=True, help="configs/pipeline.py[:PRESET]")
    parser.add_argument("--workdir", required=True, help="run directory (resumes if present)")
    parser.add_argument("--stages", default=None, help=f"comma separated, from {ALL_STAGES}")
    parser.add_argument("--from-stage", default=None, help="rerun this stage and later ones")
    args = parser.parse_args(rest)
    config = loader.load(args.config, overrides)
    if config.get("stage") != "pipeline":
        raise PipelineError(f"--config {args.config} is not a pipeline config")
    sized = pipeline_sizing.size_to_task(config, pipeline_sizing.overridden_keys(overrides))
    return args, sized


def main(argv: Sequence[str]) -> int:
    # jax and the stages load only once arguments parse
    from orchestrate import pipeline_stages

    try:
        args, config = parse_args(argv)
        selected = select_stages(config, args.stages)
        workdir = pathlib.Path(args.workdir)
        state = read_state(workdir)
        to_run, reset = plan(config, selected, state, args.from_stage)
        pipeline_stages.check(config)
    except (loader.ConfigError, PipelineError, ValueError) as err:
        print(f"flaxlm pipeline: error: {err}", file=sys.stderr)
        return 2
    workdir.mkdir(parents=True, exist_ok=True)
    for stage in reset:
        move_aside(workdir, stage)
        state["stages"].pop(stage, None)
    write_json_atomic(workdir / "config.json", config.to_dict())
    write_json_atomic(workdir / STATE_FILE, state)
    skipped = [s for s in selected if s not in to_run]
    if skipped:
        print(f"pipeline: already finished: {', '.join(skipped)}", file=sys.stderr)
    sized = None  # the config grown to fit the data, once data and tokenizer exist
    for number, stage in enumerate(to_run, 1):
        print(f"\n=== pipeline stage {number}/{len(to_run)}: {stage} ===", file=sys.stderr)
        start = time.perf_counter()
        if stage not in BEFORE_SIZING and sized is None:
            try:
                sized = pipeline_sizing.size_to_data(config, workdir)
            except (ValueError, OSError) as err:
                print(f"flaxlm pipeline: sizing to the data: error: {err}", file=sys.stderr)
                return 2
        code = pipeline_stages.run(stage, config if sized is None else sized, workdir)
        seconds = time.perf_counter() - start
        previous = state["stages"].get(stage, {}).get("seconds", 0.0)
        if code != 0:
            state["stages"][stage] = {"done": False, "seconds": round(previous + seconds, 2)}
            write_json_atomic(workdir / STATE_FILE, state)
            print(
                f"flaxlm pipeline: stage {stage} stopped (exit {code}); rerun the same "
                "command to resume it",
                file=sys.stderr,
            )
            return code
        state["stages"][stage] = {
            "done": True,
            "seconds": round(previous + seconds, 2),  # summed over interrupted attempts
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "config": stage_fingerprint(config, stage),
        }
        write_json_atomic(workdir / STATE_FILE, state)
        print(f"=== {stage} done in {seconds:.1f} s ===", file=sys.stderr)
    return 0
