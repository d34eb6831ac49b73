"""Sequence lengths sized to the task's data, so that no record is left out for its length.

The presets' `seq_len` and `max_new_tokens` values are floors. Once the data and the
tokenizer exist, every stage after them runs with each value grown to fit the task's
longest record through the chat template (sequence lengths rounded up to a multiple of
8), never shrunk, so a task the presets were sized for runs exactly as configured:

- sft.seq_len: the longest demonstration (prompt + response);
- ppo.seq_len, grpo.seq_len (the prompt rows; rm_data reads ppo's): the longest prompt;
- rm_data, ppo, grpo, dpo and the reward calibration's max_new_tokens: the longest
  teacher response with its end-of-turn, so a policy can give the right answer whole;
- reward.seq_len, dpo.seq_len (ranked rows): longest prompt + rm_data's max_new_tokens + 1
  (a response cut at max_new_tokens gets its end-of-turn back in the ranked file);
- pretrain.model.max_seq_len, when pretraining here: the longest row any stage makes.

`size_to_data=False` keeps the sections' values; records that do not fit are then
skipped and counted, or stop the stage under `data.bad_records=fail` (train/data/fit.py).
The pipeline's recorded config (fingerprints, config.json) keeps the values as given.

Counts sized to the task (`size_to_task`): a task may say how much more of the preset's
data and steps it needs, as factors in a `preset_scale` attribute (dotted pipeline keys,
e.g. rlhf/more_tasks.py's `Rotate`: 10x the SFT demonstrations, 4x the SFT steps). The
pipeline multiplies each such preset value when it reads the config, before anything
runs, so the recorded config and the stage fingerprints hold the values that ran; a key
set on the command line is taken as given. `size_to_task=False` keeps every value.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys
from collections.abc import Collection, Iterable, Mapping

import ml_collections

from orchestrate.workdir import data_paths

MULTIPLE = 8
NEW_TOKEN_KEYS = (
    "rm_data.max_new_tokens",
    "ppo.ppo.max_new_tokens",
    "grpo.grpo.max_new_tokens",
    "dpo.dpo.max_new_tokens",
    "reward.calibration.max_new_tokens",
)


@dataclasses.dataclass(frozen=True)
class DataLengths:
    """Token counts of the task's longest records through the chat template."""

    sft: int  # a demonstration's row positions (its tokens minus one: inputs are shifted)
    prompt: int  # a prompt with the assistant marker
    response: int  # a teacher response and what the template closes it with


def round_up(n: int, multiple: int = MULTIPLE) -> int:
    return -(-n // multiple) * multiple


def read_jsonl(path: pathlib.Path) -> Iterable[dict]:
    with path.open(encoding="utf-8") as f:
        yield from (json.loads(line) for line in f if line.strip())


def measure(workdir: pathlib.Path, tokenizer) -> DataLengths:
    """The longest SFT example, prompt and teacher response in DIR/data."""
    p = data_paths(workdir)
    sft = prompt = response = 0
    for path in (p["sft"], p["sft_eval"]):
        for record in read_jsonl(path):
            user = [{"role": "user", "content": record["prompt"]}]
            whole = tokenizer.encode_chat(
                [*user, {"role": "assistant", "content": record["response"]}]
            )
            asked = tokenizer.encode_chat(user, add_generation_prompt=True)
            sft = max(sft, whole[0].size - 1)
            response = max(response, whole[0].size - asked[0].size)
    for path in (p["prompts"], p["eval_prompts"]):
        for record in read_jsonl(path):
            user = [{"role": "user", "content": record["prompt"]}]
            prompt = max(prompt, tokenizer.encode_chat(user, add_generation_prompt=True)[0].size)
    return DataLengths(sft, prompt, response)


def get_key(config: ml_collections.ConfigDict, dotted: str):
    node = config
    for part in dotted.split("."):
        node = node[part]
    return node


def needed(config: ml_collections.ConfigDict, lengths: DataLengths, pretraining: bool) -> dict:
    """Dotted key -> the value it must at least have (pure: reads `config`, returns)."""
    new = {k: max(get_key(config, k), lengths.response) for k in NEW_TOKEN_KEYS}
    out = dict(new)
    out["sft.seq_len"] = round_up(lengths.sft)
    out["ppo.seq_len"] = out["grpo.seq_len"] = round_up(lengths.prompt)
    ranked = round_up(lengths.prompt + new["rm_data.max_new_tokens"] + 1)
    out["reward.seq_len"] = out["dpo.seq_len"] = ranked
    if pretraining:
        rows = [get_key(config, "sft.seq_len"), out["sft.seq_len"]]
        rows += [get_key(config, k) for k in ("reward.seq_len", "dpo.seq_len")] + [ranked]
        prompts = {
            s: max(get_key(config, f"{s}.seq_len"), out[f"{s}.seq_len"]) for s in ("ppo", "grpo")
        }
        rows += [prompts["ppo"] + new["ppo.ppo.max_new_tokens"]]
        rows += [prompts["ppo"] + new["rm_data.max_new_tokens"]]  # rm_data reads ppo.seq_len
        rows += [prompts["grpo"] + new["grpo.grpo.max_new_tokens"]]
        dpo_rows = max(get_key(config, "dpo.seq_len"), ranked)  # DPO's eval prompts use it
        rows += [dpo_rows + new["dpo.dpo.max_new_tokens"]]
        out["pretrain.model.max_seq_len"] = round_up(max(rows))
    return out


def grow(
    config: ml_collections.ConfigDict, lengths: DataLengths, pretraining: bool
) -> tuple[ml_collections.ConfigDict, list[str]]:
    """A copy of `config` with every value below its need raised to it, and one line per
    change."""
    sized = ml_collections.ConfigDict(config.to_dict())
    changes = []
    for key, value in needed(config, lengths, pretraining).items():
        current = get_key(config, key)
        if value > current:
            set_key(sized, key, value)
            changes.append(f"{key} {current} -> {value}")
    return sized, changes


def set_key(config: ml_collections.ConfigDict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    node = config
    for part in parents:
        node = node[part]
    node[leaf] = value


def size_to_data(config: ml_collections.ConfigDict, workdir: pathlib.Path):
    """`config` grown to fit DIR/data through the run's tokenizer (the base model's with
    `init_from`), telling on stderr what grew; `config` itself when sizing is off."""
    from model.tokenizer import load_tokenizer
    from train.parent import read_parent

    if not config.get("size_to_data", True):
        return config
    if config.init_from:
        tokenizer_dir = read_parent(config.init_from).tokenizer_dir
        if tokenizer_dir is None:
            raise ValueError(f"init_from={config.init_from} records no tokenizer")
    else:
        tokenizer_dir = data_paths(workdir)["tokenizer"]
    lengths = measure(workdir, load_tokenizer(tokenizer_dir))
    sized, changes = grow(config, lengths, pretraining=not config.init_from)
    if changes:
        print(
            f"pipeline: sized to the data (longest SFT example {lengths.sft}, prompt "
            f"{lengths.prompt}, response {lengths.response} tokens): {'; '.join(changes)}",
            file=sys.stderr,
        )
    return sized


# ----------------------------------------------------------------------------- task counts


def scale_to_task(
    config: ml_collections.ConfigDict,
    scales: Mapping[str, float],
    explicit: Collection[str],
    task: str,
) -> tuple[ml_collections.ConfigDict, list[str]]:
    """A copy of `config` with each count in `scales` multiplied by its factor (rounded,
    at least 1), except the keys in `explicit`; and one line per change. Raises
    ValueError naming the task and the key when a key is not a count of the config or a
    factor is not a positive number."""
    sized = ml_collections.ConfigDict(config.to_dict())
    changes = []
    for key, factor in scales.items():
        try:
            current = get_key(config, key)
        except (KeyError, AttributeError):
            raise ValueError(
                f"task {task}: preset_scale names {key!r}, not a pipeline key"
            ) from None
        if isinstance(current, bool) or not isinstance(current, int):
            raise ValueError(f"task {task}: preset_scale key {key!r} is not a count ({current!r})")
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 0:
            raise ValueError(
                f"task {task}: preset_scale[{key!r}] = {factor!r}, not a positive number"
            )
        if key in explicit:
            continue
        value = max(1, round(current * factor))
        if value != current:
            set_key(sized, key, value)
            changes.append(f"{key} {current} -> {value}")
    return sized, changes


def overridden_keys(overrides: Iterable[str]) -> set[str]:
    """The dotted keys of `key=value` command-line overrides."""
    return {item.partition("=")[0] for item in overrides}


def size_to_task(config: ml_collections.ConfigDict, explicit: Collection[str]):
    """`config` with the task's `preset_scale` applied (see the module docstring), telling
    on stderr what changed; `config` itself when sizing is off or the task asks nothing."""
    from rlhf.tasks import load_task

    if not config.get("size_to_task", True):
        return config
    scales = getattr(load_task(config.task), "preset_scale", None) or {}
    sized, changes = scale_to_task(config, scales, explicit, config.task)
    if not changes:
        return config
    print(f"pipeline: sized to the task {config.task}: {'; '.join(changes)}", file=sys.stderr)
    return sized
