"""Load `path/to/config.py:ARG`, apply `--config.key=value` overrides, resolve the model.

Errors name the key: an unknown key, a value of the wrong type or an invalid value all
raise ConfigError with one line that says which key and why.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import pathlib
from collections.abc import Sequence
from typing import Any

import ml_collections

from model.config import ModelConfig, get_preset


class ConfigError(ValueError):
    pass


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """`file.py` or `file.py:ARG` -> get_config(ARG)."""
    path, _, arg = spec.partition(":")
    file = pathlib.Path(path)
    if not file.is_file():
        raise ConfigError(f"--config: no such file {path!r}")
    module_spec = importlib.util.spec_from_file_location(f"_flaxlm_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"--config: {path} defines no get_config(arg)")
    try:
        return module.get_config(arg or None)
    except (KeyError, ValueError) as err:
        raise ConfigError(f"--config {spec}: {err}") from None


def _model_field_type(name: str) -> type:
    fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
    default = getattr(ModelConfig(), name)
    return type(default) if name in fields else str


def parse_value(key: str, text: str, current: Any) -> Any:
    """Parse `text` as the type of the current value (or of the ModelConfig field)."""
    if current is None and key.startswith("model."):
        kind = _model_field_type(key.split(".", 1)[1])
    elif current is None:
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text
    else:
        kind = type(current)
    try:
        if kind is bool:
            lowered = text.lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(text)
            return lowered in ("true", "1", "yes")
        if kind is int:
            value = float(text)
            if not math.isfinite(value) or value != int(value):  # int(inf) would overflow
                raise ValueError(text)
            return int(value)
        if kind is float:
            value = float(text)
            if math.isnan(value):  # passes every `<= 0` check, then poisons the run
                raise ValueError(text)
            return value
    except ValueError:
        finite = " (a finite number)" if kind in (int, float) else ""
        raise ConfigError(f"--config.{key}={text!r}: expected {kind.__name__}{finite}") from None
    return text


def apply_overrides(
    config: ml_collections.ConfigDict, overrides: Sequence[str]
) -> ml_collections.ConfigDict:
    """Apply ["key=value", ...] (dotted keys, no '--config.' prefix)."""
    config = ml_collections.ConfigDict(config.to_dict())  # a copy
    with config.unlocked():
        for item in overrides:
            key, sep, text = item.partition("=")
            if not sep:
                raise ConfigError(f"--config.{key}: missing '=value'")
            *parents, leaf = key.split(".")
            node = config
            for i, part in enumerate(parents):
                if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
                    raise ConfigError(f"--config.{key}: unknown key {'.'.join(parents[: i + 1])!r}")
                node = node[part]
            if leaf not in node:
                known = ", ".join(sorted(node.keys()))
                raise ConfigError(f"--config.{key}: unknown key (known here: {known})")
            if isinstance(node[leaf], ml_collections.ConfigDict):
                raise ConfigError(f"--config.{key}: is a section, set one of its keys")
            try:
                node[leaf] = parse_value(key, text, node[leaf])
            except TypeError as err:
                raise ConfigError(f"--config.{key}={text!r}: {err}") from None
    return config


def split_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separate `--config.key=value` / `--config.key value` overrides from other args."""
    rest, overrides = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config."):
            body = arg[len("--config.") :]
            if "=" not in body:
                if i + 1 >= len(argv):
                    raise ConfigError(f"{arg}: missing value")
                body = f"{body}={argv[i + 1]}"
                i += 1
            overrides.append(body)
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def load(spec: str, overrides: Sequence[str]) -> ml_collections.ConfigDict:
    return apply_overrides(load_config_file(spec), overrides)


def model_config(config: ml_collections.ConfigDict) -> ModelConfig:
    """The ModelConfig: `model.preset` with every non-None `model.<field>` applied."""
    section = config.model.to_dict()
    preset = section.pop("preset")
    section.pop("lora", None)  # adapters, not the model's shape (model/lora.py)
    changes = {k: v for k, v in section.items() if v is not None}
    try:
        return get_preset(preset, **changes)
    except (ValueError, TypeError) as err:
        raise ConfigError(str(err)) from None


def check_positive(config: ml_collections.ConfigDict, *keys: str) -> None:
    for key in keys:
        node: Any = config
        for part in key.split("."):
            node = node[part]
        if not isinstance(node, (int, float)) or node <= 0:
            raise ConfigError(f"{key}={node!r}: must be positive")
