"""What every training stage does around the loop: mesh and state from the config,
workdir outputs, restore-or-start, and one-line errors for bad input.

Stages (pretrain, sft, reward, ...) build their model, step function and data, then call
`run_stage`. All validation happens before anything is written to the workdir.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections

from configs import loader, stages
from configs.meshes import apply_mesh_preset
from model import lora
from model import sharding as sh
from train import distributed
from train.checkpoint import Checkpointer, CheckpointSaveError, abstract_with_shardings
from train.data import eval_overlap
from train.integrity import write_json
from train.loop import LoopSettings, NonFiniteLossError, Preempted, train_loop
from train.metrics import MetricWriter
from train.parent import InitFromError, Parent, read_parent, shape_keys, with_shape_defaults

NONFINITE_POLICIES = ("stop", "skip")
TOKENIZER_DIR = "tokenizer"  # every stage's workdir keeps its tokenizer here


class StageError(ValueError):
    """Bad input to a stage: reported as one line, non-zero exit, workdir untouched."""


# What a checkpoint holds, by the stage that wrote it (meta "stage"; configs/stages.py):
# a raw LM (pretraining, an imported model), a chat policy (both have an LM head) or a
# reward model (a scalar head, no LM head). SFT and reward take any LM; the RLHF stages a
# chat policy (it is also their frozen reference): one trained here, or an imported
# checkpoint (an instruct model; its tokenizer must have a chat template, which every
# stage checks when it starts). flaxlm's own pretraining is not a policy: it never saw a
# chat. A reward model is never a policy: its parameters would load under an LM head they
# were never trained with.
RAW_LM_STAGES = tuple(
    w for w in stages.writers(stages.LM) if w in stages.IMPORTED or w not in stages.POLICIES
)
CHAT_POLICIES = stages.writers(stages.POLICY)
INIT_FROM_KINDS = {s: stages.start_kind(s) for s in stages.COMMANDS if s != "pretrain"}
REWARD_FROM_KIND = ("a reward model", stages.writers(stages.REWARD))  # PPO's, GRPO's reward_from


def parent_kind(parent: Parent) -> str:
    """The stage a checkpoint counts as: its own, except that an HF model imported with a
    scalar head (a sequence classifier) is a reward model."""
    heads = parent.meta.get("heads") or {}
    if parent.stage == "import-hf" and heads.get("scalar_head"):
        return "reward"
    return parent.stage


def check_parent_kind(parent: Parent, key: str, kind: tuple[str, tuple[str, ...]]) -> None:
    """Refuse a `key` (init_from, reward_from) checkpoint that is not of `kind`
    (an INIT_FROM_KINDS value or REWARD_FROM_KIND), naming what it is instead."""
    words, stages = kind
    found = parent_kind(parent)
    if found not in stages:
        listed = f" ({', '.join(stages)})" if len(stages) > 1 else ""
        raise StageError(f"{key}={parent.checkpoint} is a {found} checkpoint, not {words}{listed}")


def parse_stage_args(
    prog: str, argv: Sequence[str]
) -> tuple[argparse.Namespace, ml_collections.ConfigDict]:
    rest, overrides = loader.split_argv(argv)
    parser = argparse.ArgumentParser(
        prog=f"flaxlm {prog}",
        description=f"flaxlm {prog} stage; override any config key with --config.KEY=VALUE",
    )
    parser.add_argument("--config", required=True, help="configs/FILE.py[:PRESET]")
    parser.add_argument("--workdir", required=True, help="run directory (resumes if present)")
    args = parser.parse_args(rest)
    try:
        config = apply_mesh_preset(loader.load(args.config, overrides), overrides)
    except ValueError as err:  # an unknown mesh.preset
        raise loader.ConfigError(str(err)) from None
    return args, config


def mesh_from_config(config: ml_collections.ConfigDict) -> tuple[jax.sharding.Mesh, sh.Rules]:
    rules = sh.get_rules(config.mesh.strategy)
    mesh = sh.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    return mesh, rules


def validate_common(config: ml_collections.ConfigDict) -> None:
    loader.check_positive(
        config,
        "total_steps",
        "batch_size",
        "seq_len",
        "grad_accum_steps",
        "log.every_steps",
        "checkpoint.max_to_keep",
    )
    if "lora" in config.get("model", {}):
        lora.from_config(config)  # bad model.lora.* keys fail here, naming the key
    if config.nonfinite not in NONFINITE_POLICIES:
        raise StageError(f"nonfinite={config.nonfinite!r}: choose from {NONFINITE_POLICIES}")
    for key in ("eval.every_steps", "checkpoint.every_steps"):
        section, leaf = key.split(".")
        if config[section][leaf] < 0:
            raise StageError(f"{key}={config[section][leaf]}: must be >= 0")


def check_resume_compatible(saved: dict, current: dict, keys: Sequence[str]) -> None:
    """Refuse to resume a workdir whose checkpoint was made with a different shape."""
    changed = [k for k in keys if saved.get(k) != current.get(k)]
    if changed:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in changed)
        raise StageError(
            f"the workdir's checkpoint was made with other settings ({details}); "
            "use a new --workdir or the original settings"
        )


def restore_or_start(
    checkpointer: Checkpointer,
    state: Any,
    shardings: Any,
    batches: Any,
    model_dict: dict | None = None,
    lora_dict: dict | None = None,
) -> tuple[Any, dict | None]:
    """Continue from the newest intact checkpoint, if any (state and data position).

    A checkpoint whose model config differs from `model_dict`, or whose LoRA adapters
    differ from `lora_dict` (the meta's `lora`, {} without), is refused (StageError),
    never treated as damaged."""
    abstract = abstract_with_shardings(jax.eval_shape(lambda: state), shardings)

    def check(meta: dict) -> None:
        if model_dict is not None and "model" in meta:
            check_model_shape(meta["model"], model_dict)
        if lora_dict is not None:
            check_lora_resume(meta.get("lora"), lora_dict)

    restored = checkpointer.restore(abstract, check_meta=check)
    if restored is None:
        return state, None
    step, new_state, data_state, meta = restored
    if data_state:
        batches.set_state(data_state)
    print(f"resuming from checkpoint step {step}", file=sys.stderr)
    return new_state, meta


def check_workdir_model(
    workdir: pathlib.Path, model_dict: dict | None, lora_dict: dict | None = None
) -> None:
    """Refuse, before anything is written, to resume a workdir whose newest checkpoint
    holds another model shape (its config.json and checkpoints stay as they are).
    Numerics that leave shapes alone (dtype, remat, dropout, ...) may change on resume."""
    if model_dict is None or not (workdir / "checkpoints").is_dir():
        return
    try:
        saved = read_parent(workdir)
    except InitFromError:  # no readable checkpoint yet: nothing to protect
        return
    check_model_shape(saved.model, model_dict)
    if lora_dict is not None:
        check_lora_resume(saved.meta.get("lora"), lora_dict)


def check_lora_resume(saved: dict | None, current: dict) -> None:
    """Refuse to resume adapters of another rank or targets (or none, or new ones):
    their shapes differ. alpha may change, like the other numerics."""
    saved, current = saved or {}, current or {}
    for key in ("rank", "targets"):
        if saved.get(key) != current.get(key):
            raise StageError(
                f"model.lora.{key}={current.get(key)!r}: the workdir's checkpoint was made "
                f"with model.lora.{key}={saved.get(key)!r}; use a new --workdir or the "
                "original settings"
            )


def check_model_shape(saved: dict, model_dict: dict) -> None:
    """Refuse (StageError, naming the key) a model config whose parameter shapes differ
    from those of a checkpoint's `saved` one. A field either side lacks reads as its
    default (what the model meant before the field existed)."""
    saved, model_dict = with_shape_defaults(saved), with_shape_defaults(model_dict)
    check_resume_compatible(
        {f"model.{k}": v for k, v in saved.items()},
        {f"model.{k}": v for k, v in model_dict.items()},
        [f"model.{k}" for k in shape_keys(saved)],
    )


def _host_invariant(meta: dict) -> dict:
    """The parts of a checkpoint's meta that must be equal on every host (not the time)."""
    lineage = dict(meta.get("lineage") or {})
    lineage.pop("time", None)
    return {**meta, "lineage": lineage}


def run_stage(
    prog: str,
    workdir: pathlib.Path,
    config: ml_collections.ConfigDict,
    build: Callable[[], StageParts],
) -> int:
    """Validate and build (no writes), then write config.json and run the loop.

    `build()` returns the stage's StageParts; its `after_build(workdir)` writes the stage
    files (the tokenizer) once validation has passed.
    """
    try:
        parts = checked_build(prog, config, build, workdir)
    except (loader.ConfigError, StageError, ValueError, FileNotFoundError, TypeError) as err:
        print(f"flaxlm {prog}: error: {err}", file=sys.stderr)
        return 2
    batches = parts.batches
    if not isinstance(batches, distributed.GlobalDataIterator):
        reset = bool(config.get("data", {}).get("reset_position", False))
        batches = distributed.GlobalDataIterator([batches], reset=reset)
    workdir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        write_json(workdir / "config.json", config.to_dict())
        parts.after_build(workdir)
    checkpointer = Checkpointer(
        workdir,
        config.checkpoint.max_to_keep,
        config.checkpoint.keep_best,
        config.checkpoint.async_save,
    )
    try:
        return train_from_checkpoint(prog, workdir, parts, batches, checkpointer)
    except (
        NonFiniteLossError,
        StageError,
        distributed.DataStateError,
        CheckpointSaveError,
    ) as err:
        print(f"flaxlm {prog}: error: {err}", file=sys.stderr)
        return 3
    except Preempted as stop:
        return stop.code
    finally:
        checkpointer.close()


def checked_build(
    prog: str,
    config: ml_collections.ConfigDict,
    build: Callable[[], StageParts],
    workdir: pathlib.Path,
) -> StageParts:
    """Validate, build and check against the workdir; nothing is written yet.

    Every host must run the same config: checked before the (slow) build, and after it
    for what the build derives (tokenizer, vocab), which also keeps process 0 from
    writing the workdir while another host still reads it."""
    distributed.check_same_everywhere(config.to_dict())
    validate_common(config)
    overlap = eval_overlap.warning(config)
    if overlap and jax.process_index() == 0:
        print(f"flaxlm {prog}: {overlap}", file=sys.stderr)
    parts = build()
    distributed.check_same_everywhere(_host_invariant(parts.meta), "resolved config")
    check_workdir_model(workdir, parts.meta.get("model"), parts.meta.get("lora", {}))
    return parts


def train_from_checkpoint(
    prog: str, workdir: pathlib.Path, parts: StageParts, batches: Any, checkpointer: Checkpointer
) -> int:
    """Restore the newest checkpoint (or start), then run the loop to total_steps."""
    state, _ = restore_or_start(
        checkpointer,
        parts.state,
        parts.shardings,
        batches,
        parts.meta.get("model"),
        parts.meta.get("lora", {}),
    )
    settings = parts.settings
    if int(state.step) >= settings.total_steps:
        print(
            f"flaxlm {prog}: already finished ({settings.total_steps} steps) in {workdir}",
            file=sys.stderr,
        )
        return 0
    writer = MetricWriter(workdir, resume_step=int(state.step))
    try:
        train_loop(
            state,
            parts.train_step,
            batches,
            parts.to_device,
            checkpointer,
            parts.meta,
            writer,
            settings,
            parts.eval_fn,
        )
    finally:
        writer.close()
    return 0


def loop_settings(
    config: ml_collections.ConfigDict, desc: str, tokens_per_step: int, flops_per_token: float
) -> LoopSettings:
    """The loop's settings from the keys every stage shares."""
    from train.metrics import peak_flops_per_device  # measures the CPU once: only when built

    return LoopSettings(
        total_steps=config.total_steps,
        tokens_per_step=tokens_per_step,
        log_every=config.log.every_steps,
        eval_every=config.eval.every_steps,
        checkpoint_every=config.checkpoint.every_steps,
        flops_per_token=flops_per_token,
        peak_flops_per_device=peak_flops_per_device(config.log.peak_flops_per_device),
        nonfinite=config.nonfinite,
        stop_at_step=config.stop_at_step,
        desc=desc,
    )


@dataclasses.dataclass
class StageParts:
    """What a stage's `build()` hands to `run_stage`: the loop's inputs and the checkpoint
    meta, plus the pieces that tools and tests drive themselves (model, tokenizer, mesh,
    rules, and a stage's own `extras`, e.g. PPO's frozen reference and scoring)."""

    state: Any
    shardings: Any
    train_step: Callable
    batches: Any
    settings: LoopSettings
    meta: dict[str, Any]
    eval_fn: Callable | None
    model: Any
    tokenizer: Any
    mesh: jax.sharding.Mesh
    rules: sh.Rules
    extras: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_device(self, batch: Any) -> Any:
        """A host batch -> the global, sharded batch the step takes."""
        from train.data import pipelines  # data pipelines are only needed once a stage builds

        return pipelines.make_global_batch(batch, self.mesh, self.rules)

    def after_build(self, workdir: pathlib.Path) -> None:
        """Stage files written once validation has passed: the tokenizer."""
        self.tokenizer.save(workdir / TOKENIZER_DIR)


def begin_build(
    config: ml_collections.ConfigDict,
    validate: Callable[[ml_collections.ConfigDict], None] | None = None,
) -> tuple[jax.sharding.Mesh, sh.Rules]:
    """How every build starts: the stage's own config checks, then the mesh and its rules."""
    if validate is not None:
        validate(config)
    return mesh_from_config(config)


def stage_parts(
    *,
    stage: str,
    config: ml_collections.ConfigDict,
    model_cfg: Any,
    tokenizer: Any,
    lineage: dict,
    model: Any,
    state: Any,
    shardings: Any,
    train_step: Callable,
    batches: Any,
    work_per_step: tuple[int, float],
    make_eval: Callable[[], Callable] | None,
    mesh: jax.sharding.Mesh,
    rules: sh.Rules,
    extra_meta: dict | None = None,
    extras: dict[str, Any] | None = None,
) -> StageParts:
    """StageParts with the checkpoint meta and loop settings every stage writes the same way.

    `work_per_step` is (tokens per step, model FLOPs per token) for the throughput and MFU
    figures; `make_eval()` builds the eval function, only when `eval.every_steps` > 0.
    Refuses (StageError) a global batch the mesh cannot split over its batch axes.
    """
    split = sh.batch_split(mesh, rules)
    if config.batch_size % split:
        raise StageError(
            f"batch_size={config.batch_size} does not divide over the {split} devices that "
            f"split the batch (mesh.data x mesh.fsdp); use a multiple of {split}"
        )
    adapters = lora.from_config(config)
    meta = {
        "stage": stage,
        "config": config.to_dict(),
        "model": model_cfg.to_dict(),
        "tokenizer": {"path": TOKENIZER_DIR, "fingerprint": tokenizer.fingerprint},
        "lineage": lineage,
        **({"lora": adapters.to_dict()} if adapters.enabled else {}),  # model/lora.py
        **(extra_meta or {}),
    }
    return StageParts(
        state=state,
        shardings=shardings,
        train_step=train_step,
        batches=batches,
        settings=loop_settings(config, stage, *work_per_step),
        meta=meta,
        eval_fn=make_eval() if make_eval is not None and config.eval.every_steps else None,
        model=model,
        tokenizer=tokenizer,
        mesh=mesh,
        rules=rules,
        extras=extras or {},
    )


def stage_main(
    prog: str,
    build: Callable[[ml_collections.ConfigDict, pathlib.Path], StageParts],
    argv: Sequence[str],
) -> int:
    """`flaxlm PROG --config FILE[:PRESET] --workdir DIR [--config.KEY=VALUE ...]`."""
    try:
        args, config = parse_stage_args(prog, argv)
    except loader.ConfigError as err:
        print(f"flaxlm {prog}: error: {err}", file=sys.stderr)
        return 2
    workdir = pathlib.Path(args.workdir)
    return run_stage(prog, workdir, config, lambda: build(config, workdir))
