"""Checkpoint files that are whole or detectably damaged.

Orbax stores no checksum of the array data (a flipped byte restores silently), so once a
step is finalized process 0 writes `N/integrity.json`: the size and sha256 of every file
of the step. A step without one is restored unverified, with a warning: it was saved
before this check existed, or the run was killed between Orbax's finalization and the
manifest write (the manifest is written only after finalization, so it never describes a
half-written step). JSON side files are written atomically (`write_json`).
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from typing import Any

import jax

from train import distributed

MANIFEST = "integrity.json"  # in each step directory: relative path -> size, sha256


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


def integrity_status(step_dir: pathlib.Path) -> str:
    """The verdict: ok, unverified (no manifest) or the problem. Process 0 alone reads the
    files (the workdir is shared) and every process gets its verdict, so all hosts take
    the same checkpoint."""
    status = ""
    if jax.process_index() == 0:
        try:
            status = integrity_problem(step_dir) or "ok"
        except FileNotFoundError:
            status = "unverified"
    return distributed.allgather_bytes(status.encode())[0].decode()


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
