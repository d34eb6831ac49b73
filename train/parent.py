"""Starting from another run: its lineage, its meta and its parameters (init_from).

A later stage (SFT, reward, RLHF) starts from another run's checkpoint: it takes that
run's model shape, tokenizer and parameters, and records the parent in its lineage.
Reading a parent loads no arrays (`read_parent`); `load_params` restores its parameters
onto the child's shapes and shardings, after checking the step's integrity manifest.
"""

from __future__ import annotations

import datetime
import logging
import pathlib
import subprocess
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec

from model import lora
from model.config import PLAIN_LLAMA
from train.integrity import integrity_status


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
    """A run's origin for its checkpoint meta: stage, parent checkpoint, git revision, time."""
    return {
        "stage": stage,
        "parent": parent,
        "git_revision": git_revision(),
        "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


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


def with_shape_defaults(model: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's model config with the fields older metas lack filled in: a meta
    written before `norm`, `position` and the other family fields existed means the only
    choices then, the plain Llama block (model/config.PLAIN_LLAMA)."""
    return {**PLAIN_LLAMA, **model}


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
    status = integrity_status(parent.checkpoint)
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
