"""Safetensors files of a Hugging Face model directory: streaming reads, sharded writes.

Weights are written with safetensors only (never pickle), with metadata {"format": "pt"}:
the tensors are in PyTorch layout, and `transformers` treats other values as TF or Flax
checkpoints. Above `max_shard_bytes` they are split into `model-0000i-of-0000n.safetensors`
plus `model.safetensors.index.json` ({"metadata": {"total_size"}, "weight_map"}), as
`save_pretrained` does. Reads go through `safe_open` (memory-mapped), one tensor at a
time; importing ml_dtypes registers numpy's "bfloat16", so BF16 checkpoints read as
numpy arrays without torch.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
# transformers' own default shard size for save_pretrained (v4: "5GB").
DEFAULT_SHARD_BYTES = 5 * 10**9
METADATA = {"format": "pt"}
DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


class SafetensorsDir:
    """Read tensors by name from a directory's `model.safetensors` or its sharded files.

    Files are opened lazily with `safe_open` (memory-mapped); `get` copies one tensor
    (or nothing more than it) into host memory, in its stored dtype.
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = os.fspath(directory)
        index = os.path.join(self.directory, INDEX_FILE)
        single = os.path.join(self.directory, SINGLE_FILE)
        if os.path.isfile(index):
            with open(index) as f:
                self.weight_map = dict(json.load(f)["weight_map"])
        elif os.path.isfile(single):
            with safe_open(single, framework="numpy") as f:
                self.weight_map = {name: SINGLE_FILE for name in f.keys()}  # noqa: SIM118
        else:
            raise FileNotFoundError(
                f"{self.directory}: no {SINGLE_FILE} or {INDEX_FILE} (only safetensors "
                "checkpoints are read; pickled .bin files are refused)"
            )
        self._handles: dict[str, Any] = {}

    def names(self) -> list[str]:
        return list(self.weight_map)

    def _handle(self, name: str) -> Any:
        if name not in self.weight_map:
            raise KeyError(f"{self.directory}: no tensor {name!r}")
        file = self.weight_map[name]
        if file not in self._handles:
            self._handles[file] = safe_open(
                os.path.join(self.directory, file), framework="numpy"
            ).__enter__()
        return self._handles[file]

    def get(self, name: str) -> np.ndarray:
        return self._handle(name).get_tensor(name)

    def close(self) -> None:
        for handle in self._handles.values():
            handle.__exit__(None, None, None)
        self._handles.clear()


def plan_shards(sizes: Sequence[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    """Greedy, order-preserving split of (name, bytes) into files of <= max_shard_bytes.

    A tensor larger than the limit gets a file of its own.
    """
    shards: list[list[str]] = [[]]
    used = 0
    for name, size in sizes:
        if shards[-1] and used + size > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards


def shard_file_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_FILE]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def write_safetensors(
    directory: str | os.PathLike,
    shapes: Sequence[tuple[str, tuple[int, ...]]],
    tensor: Callable[[str], np.ndarray],
    dtype: str = "float32",
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> list[str]:
    """Write tensors (fetched one by one with `tensor(name)`) into sharded files.

    shapes: (name, HF shape) in file order, known before anything is fetched, so the
    file names (`-of-N`) and index are fixed up front. Host memory holds one shard.
    Each file is written to a temporary name and renamed. Returns the file names.
    """
    np_dtype = np.dtype(DTYPES[dtype])
    sizes = [(name, math.prod(shape) * np_dtype.itemsize) for name, shape in shapes]
    shards = plan_shards(sizes, max_shard_bytes)
    files = shard_file_names(len(shards))
    os.makedirs(directory, exist_ok=True)
    for names, file in zip(shards, files, strict=True):
        arrays = {name: np.ascontiguousarray(tensor(name), np_dtype) for name in names}
        path = os.path.join(directory, file)
        save_file(arrays, path + ".tmp", metadata=METADATA)
        os.replace(path + ".tmp", path)
    if len(files) > 1:
        weight_map = {
            name: file for names, file in zip(shards, files, strict=True) for name in names
        }
        index = {"metadata": {"total_size": sum(s for _, s in sizes)}, "weight_map": weight_map}
        write_json(os.path.join(directory, INDEX_FILE), index)
    return files


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory}: no {CONFIG_FILE} (not a Hugging Face model dir)")
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as err:  # not JSON (or not UTF-8): one line naming the file
        raise ValueError(f"{path}: not valid JSON ({err})") from None
