"""JSON files the orchestration reads and writes: atomic writes, tolerant reads, records."""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any


def read_json(path: pathlib.Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def write_json_atomic(path: pathlib.Path, value: Any) -> None:
    """Write then rename, so a kill never leaves a half-written file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # hosts may share the directory
    tmp.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def read_records(path: pathlib.Path) -> list[dict[str, Any]]:
    """The records of a .jsonl file, or a .json summary as one record; [] if missing."""
    if not path.is_file():
        return []
    if path.suffix == ".json":
        return [json.loads(path.read_text())]
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
