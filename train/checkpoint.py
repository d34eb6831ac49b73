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
Nothing is pickled.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import pathlib
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec

from model import lora
from train import distributed

ITEMS = ("state", "data", "meta")
MANIFEST = "integrity.json"  # in each step directory: relative path -> size, sha256


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written (e.g. a full disk): one line naming the step."""


class CheckpointDamagedError(ValueError):
    """A checkpoint's files disagree with its integrity manifest."""


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


# ----------------------------------------------------------------------------- integrity
# Orbax stores no checksum of the array data (a flipped byte restores silently), so each
# finalized step gets a manifest. A step without one is restored unverified, with a
# warning: it was saved before this check existed, or the run was killed between Orbax's
# finalization and the manifest write (the manifest is written only after finalization,
# so it never describes a half-written step).


def _sha256(path: pathlib.Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _step_files(step_dir: pathlib.Path) -> list[pathlib.Path]:
    """Every file of a step except the manifest itself (and its temporary copy)."""
    skip = {MANIFEST, MANIFEST + ".tmp"}
    files = (p for p in step_dir.rglob("*") if p.is_file())
    return sorted(p for p in files if p.relative_to(step_dir).as_posix() not in skip)


def file_table(step_dir: pathlib.Path) -> dict[str, dict[str, Any]]:
    """relative path -> {"size", "sha256"} for every file of the step."""
    return {
        p.relative_to(step_dir).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in _step_files(step_dir)
    }


def write_manifest(step_dir: pathlib.Path) -> None:
    write_json(step_dir / MANIFEST, {"version": 1, "files": file_table(step_dir)})


def integrity_problem(step_dir: pathlib.Path) -> str | None:
    """What is wrong with the step's files against its manifest, or None when they match.

    Raises FileNotFoundError when the step has no manifest. Files the manifest does not
    list are ignored. Sizes are compared first (cheap); hashing stops at the first
    mismatch.
    """
    try:
        files = json.loads((step_dir / MANIFEST).read_text(encoding="utf-8"))["files"]
        recorded = {str(k): (int(v["size"]), str(v["sha256"])) for k, v in files.items()}
    except FileNotFoundError:  # no manifest: the caller decides
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        return f"{MANIFEST} is unreadable ({type(err).__name__}: {err})"
    for rel, (size, _) in recorded.items():
        path = step_dir / rel
        if not path.is_file():
            return f"{rel} is missing ({MANIFEST} lists it)"
        if path.stat().st_size != size:
            return f"{rel} has {path.stat().st_size} bytes, {MANIFEST} says {size}"
    for rel, (_, digest) in recorded.items():
        if _sha256(step_dir / rel) != digest:
            return f"{rel} does not match its sha256 in {MANIFEST}"
    return None


def _integrity_status(step_dir: pathlib.Path) -> str:
    """The verdict: ok, unverified (no manifest) or the problem. Process 0 alone reads the files
    (the workdir is shared) and every process gets its verdict, so all hosts take the
    same checkpoint."""
    status = ""
    if jax.process_index() == 0:
        try:
            status = integrity_problem(step_dir) or "ok"
        except FileNotFoundError:
            status = "unverified"
    return distributed.allgather_bytes(status.encode())[0].decode()


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
        status = _integrity_status(self.directory / str(step))
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


def write_json(path: str | pathlib.Path, obj: Any) -> None:
    """Write JSON atomically (temp file, fsync, rename): after a crash the file is whole or
    absent, never short (a short integrity manifest would mark an intact checkpoint
    damaged)."""
    path = pathlib.Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


# ----------------------------------------------------------------------------- init_from
# A later stage (SFT, reward, RLHF) starts from another run's checkpoint: it takes that
# run's model shape, tokenizer and parameters, and records the parent in its lineage.

# ModelConfig fields that decide parameter shapes: a child may not change them.
PARAM_SHAPE_KEYS = (
    "vocab_size",
    "d_model",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "mlp_dim",
    "tie_embeddings",
    "activation",
    "scan_layers",
    "param_dtype",
    "norm",  # layernorm adds a bias per norm
    "position",  # learned adds a [max_seq_len, d_model] table
    "qkv_bias",  # q/k/v biases (Qwen2)
    "post_norms",  # two more norms per block (Gemma 2/3)
    "qk_norm",  # q and k norm scales (Gemma 3)
)
# What a meta written before `norm`, `position` and the fields for other HF families
# existed means: the only choices then (ModelConfig's defaults).
SHAPE_DEFAULTS = {
    "norm": "rmsnorm",
    "position": "rope",
    "qkv_bias": False,
    "sliding_window": 0,
    "attention_pattern": "",
    "local_rope_theta": 0.0,
    "scale_embeddings": False,
    "norm_scale_offset": 0.0,
    "attn_scale_dim": 0.0,
    "attn_logit_softcap": 0.0,
    "final_logit_softcap": 0.0,
    "post_norms": False,
    "qk_norm": False,
}


def with_shape_defaults(model: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's model config with the fields older metas lack filled in."""
    return {**SHAPE_DEFAULTS, **model}


def shape_keys(model: dict[str, Any]) -> tuple[str, ...]:
    """The fields that fix `model`'s parameter shapes: with learned positions the table's
    length, max_seq_len, too."""
    learned = model.get("position") == "learned"
    return (*PARAM_SHAPE_KEYS, "max_seq_len") if learned else PARAM_SHAPE_KEYS


class InitFromError(ValueError):
    """The init_from checkpoint is missing or does not fit this run (one-line message)."""


class Parent:
    """A checkpoint to start from, read without loading its arrays.

    checkpoint: `<workdir>/checkpoints/N`; meta: its meta item (stage, config, model
    dict, tokenizer, lineage).
    """

    def __init__(self, checkpoint: pathlib.Path, step: int, meta: dict) -> None:
        self.checkpoint, self.step, self.meta = checkpoint, step, meta

    @property
    def workdir(self) -> pathlib.Path:
        return self.checkpoint.parent.parent

    @property
    def stage(self) -> str:
        return str(self.meta.get("stage", "unknown"))

    @property
    def model(self) -> dict:
        return dict(self.meta.get("model") or {})

    @property
    def tokenizer_dir(self) -> pathlib.Path | None:
        """Absolute tokenizer location (meta paths are relative to the parent workdir)."""
        path = (self.meta.get("tokenizer") or {}).get("path")
        return None if not path else self.workdir / path

    @property
    def tokenizer_fingerprint(self) -> str | None:
        return (self.meta.get("tokenizer") or {}).get("fingerprint")

    def lineage(self, stage: str) -> dict[str, Any]:
        """This run's lineage: parent = the checkpoint path, and the parent's own lineage."""
        return {**lineage(stage, str(self.checkpoint)), "parent_lineage": self.meta.get("lineage")}


def find_checkpoint(path: str | pathlib.Path) -> tuple[pathlib.Path, int]:
    """A run workdir (its newest committed step) or one `<workdir>/checkpoints/N` directory."""
    path = pathlib.Path(path).expanduser().resolve()
    if path.name.isdigit() and path.parent.name == "checkpoints":
        if not (path / "meta").is_dir():
            raise InitFromError(f"init_from={path}: not a checkpoint (no meta item)")
        return path, int(path.name)
    if not path.is_dir():
        raise InitFromError(f"init_from={path}: no such workdir or checkpoint directory")
    directory = path / "checkpoints"
    steps = sorted(
        int(p.name)
        for p in (directory.iterdir() if directory.is_dir() else ())
        if p.name.isdigit() and (p / "meta").is_dir() and (p / "state").is_dir()
    )
    if not steps:
        raise InitFromError(f"init_from={path}: the workdir holds no checkpoint")
    return directory / str(steps[-1]), steps[-1]


def read_parent(path: str | pathlib.Path) -> Parent:
    """Locate and read the meta of the checkpoint at `path` (no arrays are loaded)."""
    checkpoint, step = find_checkpoint(path)
    try:
        meta = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(checkpoint / "meta")
    except Exception as err:  # orbax raises several types for unreadable items
        raise InitFromError(f"init_from={checkpoint}: cannot read its meta ({err})") from None
    if not isinstance(meta, dict) or not meta.get("model"):
        raise InitFromError(f"init_from={checkpoint}: its meta has no model config")
    return Parent(checkpoint, step, dict(meta))


def child_model_dict(parent: Parent, overrides: dict[str, Any]) -> dict[str, Any]:
    """The parent's model config with `overrides` (non-None values) applied.

    Numerics that leave parameter shapes alone (dtype, dropout, remat, max_seq_len, ...)
    may change; a change to a field of `shape_keys` is refused.
    """
    model = with_shape_defaults(parent.model)
    changes = {k: v for k, v in overrides.items() if v is not None}
    unknown = sorted(set(changes) - set(model))
    if unknown:
        raise InitFromError(f"model.{unknown[0]}: not a field of the init_from model config")
    clash = [k for k in shape_keys(model) if k in changes and changes[k] != model.get(k)]
    if clash:
        details = ", ".join(
            f"model.{k}={changes[k]!r} (checkpoint: {model.get(k)!r})" for k in clash
        )
        raise InitFromError(
            f"{details}: init_from={parent.checkpoint} has other parameter shapes; "
            "drop the override or start from a matching checkpoint"
        )
    return {**model, **changes}


def check_tokenizer(parent: Parent, fingerprint: str, source: str) -> None:
    """Refuse a tokenizer other than the one the parent was trained with."""
    expected = parent.tokenizer_fingerprint
    if expected is not None and expected != fingerprint:
        raise InitFromError(
            f"tokenizer {source} (fingerprint {fingerprint}) is not the one "
            f"init_from={parent.checkpoint} was trained with (fingerprint {expected}); "
            "token ids would change meaning"
        )


def load_params(parent: Parent, target: Any, init: Any | None = None, new: tuple = ()) -> Any:
    """Restore the parent's parameters onto `target`'s shapes and shardings.

    target: the child's parameter tree of arrays or ShapeDtypeStructs carrying shardings
    (the current mesh); every leaf is read straight into its shards. Parameters the
    parent has and the child lacks (e.g. an LM head under a reward model) are skipped.
    Top-level parameters named in `new` may be absent from the parent (fresh heads such
    as `scalar_head`); they are taken from `init`. Any other absent parameter, or a leaf
    whose shape differs, is refused with its path.

    LoRA (model/lora.py): a parent holding adapters (`params["lora"]`) is read merged,
    W + (alpha/rank) * A @ B with its meta's `lora` settings, so every reader of its
    weights (a later stage's init_from, references, sample, export) gets the function it
    trained. The target's own adapters are never read from the parent: they come from
    `init` (fresh), or are left out when `init` is None (the merged base alone computes
    the same function as zero-initialized adapters).
    """
    own_adapters = target.get(lora.LORA_KEY) if isinstance(target, dict) else None
    if own_adapters is not None:
        target = {k: v for k, v in target.items() if k != lora.LORA_KEY}
    status = _integrity_status(parent.checkpoint)
    if status not in ("ok", "unverified"):  # no manifest: an older checkpoint, read as before
        raise InitFromError(f"init_from={parent.checkpoint} is damaged ({status})")
    directory = parent.checkpoint / "state"
    checkpointer = ocp.PyTreeCheckpointer()
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)  # reading one item warns that the step metadata is absent
    try:
        saved = checkpointer.metadata(directory).item_metadata.tree.get("params") or {}
        params = _restore_params(parent, checkpointer, directory, saved, target, init, new)
    finally:
        absl_logger.setLevel(level)
    if own_adapters is not None and init is not None:
        params[lora.LORA_KEY] = init[lora.LORA_KEY]
    return params


def _restore_params(
    parent: Parent,
    checkpointer: ocp.PyTreeCheckpointer,
    directory: pathlib.Path,
    saved: Any,
    target: Any,
    init: Any | None,
    new: tuple,
) -> Any:
    saved_shapes = {
        jax.tree_util.keystr(path): tuple(leaf.shape)
        for path, leaf in jax.tree_util.tree_flatten_with_path(saved)[0]
    }
    restore, fresh = {}, {}
    for name, subtree in target.items():
        present = any(k.startswith(f"['{name}']") for k in saved_shapes)
        if not present and name in new:
            if init is None:
                raise InitFromError(f"load_params: no initial value for the new {name!r}")
            fresh[name] = init[name]
            continue
        restore[name] = subtree
    for path, leaf in jax.tree_util.tree_flatten_with_path(restore)[0]:
        key = jax.tree_util.keystr(path)
        if key not in saved_shapes:
            raise InitFromError(
                f"init_from={parent.checkpoint} has no parameter params{key} "
                f"(its model: {parent.model}); the model shapes differ"
            )
        if saved_shapes[key] != tuple(leaf.shape):
            raise InitFromError(
                f"init_from={parent.checkpoint}: params{key} has shape {saved_shapes[key]}, "
                f"this model needs {tuple(leaf.shape)}"
            )
    item = {
        "params": jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), restore
        )
    }
    adapters = saved.get(lora.LORA_KEY) if isinstance(saved, dict) else None
    if adapters:  # a LoRA checkpoint: read its (small) adapters replicated, then merge
        first = jax.tree.leaves(restore)[0].sharding
        named = isinstance(first, NamedSharding)
        replicated = NamedSharding(first.mesh, PartitionSpec()) if named else first
        item["params"][lora.LORA_KEY] = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=replicated), adapters
        )
    restored = checkpointer.restore(
        directory,
        args=ocp.args.PyTreeRestore(
            item=item,
            restore_args=ocp.checkpoint_utils.construct_restore_args(item),
            partial_restore=True,
        ),
    )["params"]
    if adapters:
        restored = _merge_adapters(parent, restored, jax.tree.map(lambda x: x.sharding, restore))
    return {**restored, **fresh}


def _merge_adapters(parent: Parent, restored: dict, shardings: Any) -> dict:
    """The parent's base parameters with its adapters merged in, on `shardings`."""
    try:
        settings = lora.LoraConfig.from_dict(parent.meta.get("lora"))
    except ValueError as err:
        raise InitFromError(f"init_from={parent.checkpoint}: its meta's lora: {err}") from None
    if not settings.enabled:
        raise InitFromError(
            f"init_from={parent.checkpoint} holds LoRA adapters but its meta records no "
            "lora rank and alpha to merge them with"
        )
    merge = jax.jit(lambda p: lora.merge(p, settings.scale), out_shardings=shardings)
    return merge(restored)
