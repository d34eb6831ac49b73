"""Checkpoints: one Orbax CheckpointManager format for every stage.

A checkpoint at step N is the directory `<workdir>/checkpoints/N/` with three items:
  state  the TrainState arrays (Orbax/tensorstore; restored onto any mesh),
  data   the data iterator's state (JSON), so the next batch after resume is exact,
  meta   JSON: resolved config, stage, lineage (parent checkpoint, git revision, time) and
         the tokenizer's location.
Saves are async and atomic (Orbax writes a temporary directory and renames it), so a
kill -9 leaves either the previous checkpoint or the new one. Once Orbax has finalized a
step, process 0 writes `N/integrity.json` (size and sha256 of every file in the step), so
a flipped byte that Orbax itself would restore silently is caught. A checkpoint that
fails its integrity check or fails to restore is reported, moved to
`<workdir>/checkpoints_damaged/` (never deleted) and the previous one is used. A save that
fails (a full disk) stops the run with one line naming the step (CheckpointSaveError).
Nothing is pickled. The manifests are train/integrity.py's; reading another run's
checkpoint to start from it (init_from, lineage) is train/parent.py's.
"""

from __future__ import annotations

import logging
import os
import pathlib
import re
import shutil
import sys
from collections.abc import Callable
from typing import Any

import jax
import orbax.checkpoint as ocp

from train.integrity import MANIFEST, integrity_status, write_manifest

ITEMS = ("state", "data", "meta")


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written (e.g. a full disk): one line naming the step."""


class CheckpointDamagedError(ValueError):
    """A checkpoint's files disagree with its integrity manifest."""


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs that carry the target shardings: restore lands on this mesh."""
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )


# ----------------------------------------------------------------------------- save errors


def describe_save_error(err: BaseException) -> str:
    """The OS error behind a failed save ("[Errno 27] File too large"), else the error's
    first line. Tensorstore reports OS errors inside a long message as os_error_code."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno:
            return f"[Errno {seen.errno}] {seen.strerror or os.strerror(seen.errno)}"
        code = re.search(r"os_error_code='?(\d+)", str(seen))
        if code:
            number = int(code.group(1))
            return f"[Errno {number}] {os.strerror(number)}"
        seen = seen.__cause__ or seen.__context__
    text = re.sub(r"\s*\[tensorstore_spec=.*", "", str(err)).strip()
    first = text.splitlines()[0][:300] if text else ""
    return first or type(err).__name__


class _DropBackgroundSaveNoise(logging.Filter):
    """Orbax logs each failure of a background save with its traceback (from several
    threads, then again when asyncio collects the failed tasks) before it re-raises the
    error to the caller, which Checkpointer reports as one line: drop the copies."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and f"{os.sep}orbax{os.sep}" in record.pathname:
            return False
        return not (record.name == "asyncio" and "orbax" in record.getMessage())


_NOISE_FILTER = _DropBackgroundSaveNoise()


def _closed_loop_callback(unraisable: Any) -> bool:
    """Tensorstore finishing a write of a failed save posts its result to the event loop
    Orbax already closed; nothing waits for it any more."""
    exc, tb = unraisable.exc_value, unraisable.exc_traceback
    frames = []
    while tb is not None:
        frames.append(tb.tb_frame.f_code.co_name)
        tb = tb.tb_next
    return isinstance(exc, RuntimeError) and "call_soon_threadsafe" in frames


def _quiet_background_save_errors() -> None:
    """Install the filter and the unraisable hook once (idempotent)."""
    for name in ("absl", "asyncio"):
        logging.getLogger(name).addFilter(_NOISE_FILTER)  # no-op when already there
    previous = sys.unraisablehook
    if getattr(previous, "flaxlm_quiet", False):
        return

    def hook(unraisable: Any) -> None:
        if not _closed_loop_callback(unraisable):
            previous(unraisable)

    hook.flaxlm_quiet = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


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
        self.async_save = async_save
        self._pending: int | None = None  # the step whose save may still be running
        _quiet_background_save_errors()

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
        """Start an async save of step `step` (returns once the arrays are copied off).

        Waits for the previous save first (as Orbax would) and writes its manifest.
        Raises CheckpointSaveError when the previous or this save failed.
        """
        self._finish_pending()
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state or {}),
            meta=ocp.args.JsonSave(meta),
        )
        self._pending = step
        try:
            self.manager.save(step, args=args, metrics=metrics, force=True)
        except Exception as err:
            self._pending = None
            raise self._save_error(step, err) from None
        if not self.async_save:
            self._finish_pending()

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
                verified = self._verify(candidate)
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
            if not verified:
                print(
                    f"warning: checkpoint {self.directory / str(candidate)} has no {MANIFEST} "
                    "(saved before integrity checks, or the run stopped right after the "
                    "save); restored without verifying its files",
                    file=sys.stderr,
                )
            return candidate, restored["state"], dict(restored["data"] or {}), meta
        return None

    def _verify(self, step: int) -> bool:
        """True when the step matches its manifest, False when it has none; raises
        CheckpointDamagedError when they disagree."""
        status = integrity_status(self.directory / str(step))
        if status not in ("ok", "unverified"):
            raise CheckpointDamagedError(f"integrity check failed: {status}")
        return status == "ok"

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

    def _save_error(self, step: int, err: BaseException) -> CheckpointSaveError:
        return CheckpointSaveError(
            f"saving checkpoint {step} to {self.directory / str(step)} failed: "
            f"{describe_save_error(err)}"
        )

    def _finish_pending(self) -> None:
        """Wait for the running save; once Orbax has finalized it, write its manifest."""
        step, self._pending = self._pending, None
        try:
            self.manager.wait_until_finished()
        except Exception as err:
            if step is None:
                raise
            raise self._save_error(step, err) from None
        if step is not None and jax.process_index() == 0:  # one writer on a shared workdir
            self._write_manifest(self.directory / str(step))

    @staticmethod
    def _write_manifest(step_dir: pathlib.Path) -> None:
        if not step_dir.is_dir():  # not finalized (Orbax logged why): nothing to describe
            return
        try:
            write_manifest(step_dir)
        except OSError as err:  # the checkpoint itself is complete: it restores unverified
            (step_dir / (MANIFEST + ".tmp")).unlink(missing_ok=True)
            print(
                f"warning: writing {step_dir / MANIFEST} failed ({describe_save_error(err)}); "
                "the checkpoint will be restored without verifying its files",
                file=sys.stderr,
            )

    def wait(self) -> None:
        """Wait for the running save (CheckpointSaveError when it failed)."""
        self._finish_pending()

    def close(self) -> None:
        try:
            self._finish_pending()
        finally:
            self.manager.close()
