"""Checkpoints: one Orbax CheckpointManager format for every stage.

A checkpoint at step N is the directory `<workdir>/checkpoints/N/` with three items:
  state  the TrainState arrays (Orbax/tensorstore; restored onto any mesh),
  data   the data iterator's state (JSON), so the next batch after resume is exact,
  meta   JSON: resolved config, stage, lineage (parent checkpoint, git revision, time) and
         the tokenizer's location.
Saves are async and atomic (Orbax writes a temporary directory and renames it), so a
kill -9 leaves either the previous checkpoint or the new one. A checkpoint that fails to
restore is reported, moved to `<workdir>/checkpoints_damaged/` (never deleted) and the
previous one is used. Nothing is pickled.
"""

from __future__ import annotations

import datetime
import json
import pathlib
import shutil
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import jax
import orbax.checkpoint as ocp

ITEMS = ("state", "data", "meta")


def git_revision() -> str | None:
    """The source tree's commit (with '+dirty' when modified), or None outside git."""
    root = pathlib.Path(__file__).resolve().parents[1]
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return rev + ("+dirty" if dirty.strip() else "")


def lineage(stage: str, parent: str | None = None) -> dict[str, Any]:
    return {
        "stage": stage,
        "parent": parent,
        "git_revision": git_revision(),
        "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs that carry the target shardings: restore lands on this mesh."""
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )


class Checkpointer:
    """Save/restore (state, data-iterator state, meta) under `<workdir>/checkpoints`.

    max_to_keep: newest checkpoints kept; keep_best: additionally keep the one with the
    lowest `eval_loss` among saves that report it.
    """

    def __init__(
        self,
        workdir: str | pathlib.Path,
        max_to_keep: int = 3,
        keep_best: bool = False,
        async_save: bool = True,
    ) -> None:
        if max_to_keep < 1:
            raise ValueError(f"checkpoint.max_to_keep={max_to_keep}: must be >= 1")
        self.workdir = pathlib.Path(workdir).resolve()
        self.directory = self.workdir / "checkpoints"
        policy = ocp.checkpoint_managers.LatestN(max_to_keep)
        if keep_best:
            best = ocp.checkpoint_managers.BestN(
                get_metric_fn=lambda m: m["eval_loss"],
                reverse=True,
                n=1,
                keep_checkpoints_without_metrics=False,
            )
            policy = ocp.checkpoint_managers.AnyPreservationPolicy([policy, best])
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def save(
        self,
        step: int,
        state: Any,
        data_state: dict | None,
        meta: dict,
        metrics: dict[str, float] | None = None,
    ) -> None:
        """Start an async save of step `step` (returns once the arrays are copied off)."""
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state or {}),
            meta=ocp.args.JsonSave(meta),
        )
        self.manager.save(step, args=args, metrics=metrics, force=True)

    def restore(
        self,
        abstract_state: Any,
        step: int | None = None,
        check_meta: Callable[[dict], None] | None = None,
    ) -> tuple[int, Any, dict, dict] | None:
        """Restore `step` (default: the newest intact one) onto `abstract_state`'s shardings.

        `check_meta(meta)` runs first and may raise to refuse an incompatible checkpoint
        (another model shape): that error propagates and the checkpoint is left alone.
        Returns (step, state, data_state, meta), or None when there is no checkpoint. A
        checkpoint that cannot be read is reported on stderr, moved aside, and the next
        older one is tried.
        """
        candidates = [step] if step is not None else self.steps()[::-1]
        for candidate in candidates:
            try:
                meta = self.restore_meta(candidate)
            except Exception as err:
                if step is not None:
                    raise
                self._quarantine(candidate, err)
                continue
            if check_meta is not None:
                check_meta(meta)
            try:
                restored = self.manager.restore(
                    candidate,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
                    ),
                )
            except Exception as err:
                if step is not None:
                    raise
                self._quarantine(candidate, err)
                continue
            return candidate, restored["state"], dict(restored["data"] or {}), meta
        return None

    def restore_meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
            "meta"
        ]

    def _quarantine(self, step: int, err: Exception) -> None:
        reason = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        print(
            f"checkpoint {self.directory / str(step)} is damaged ({reason}); "
            "moved to checkpoints_damaged/ and trying the previous one",
            file=sys.stderr,
        )
        if jax.process_index() == 0:
            target = self.workdir / "checkpoints_damaged" / str(step)
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists():
                shutil.rmtree(target)
            shutil.move(str(self.directory / str(step)), str(target))
        self.manager.reload()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def write_json(path: str | pathlib.Path, obj: Any) -> None:
    """Write JSON atomically (temp file + rename) so a crash never leaves half a file."""
    path = pathlib.Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    tmp.replace(path)
