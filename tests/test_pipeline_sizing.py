"""orchestrate/pipeline_sizing.py: the pipeline grows seq_len / max_new_tokens to fit the
task's longest record, never shrinks them, and leaves the demo's shipped tasks as sized."""

import json
import pathlib

import numpy as np
import pytest

from configs import pipeline as pipeline_config
from orchestrate import pipeline, pipeline_sizing
from orchestrate.pipeline_sizing import DataLengths, get_key
from orchestrate.workdir import data_paths

CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "pipeline.py"


def demo():
    return pipeline_config.get_config("demo")


def test_a_task_that_fits_the_preset_changes_nothing():
    _, changes = pipeline_sizing.grow(demo(), DataLengths(sft=20, prompt=16, response=6), True)
    assert changes == []


def test_longer_records_grow_every_length_that_reads_them():
    lengths = DataLengths(sft=45, prompt=40, response=13)
    sized, changes = pipeline_sizing.grow(demo(), lengths, pretraining=True)
    # By hand: sft 45 -> 48; prompts 40 -> 40; new tokens 13; ranked rows 40 + 13 + 1 = 54
    # -> 56; the longest row is DPO's eval, 56 + 13 = 69 -> 72 > the char model's 64.
    expected = {"sft.seq_len": 48, "ppo.seq_len": 40, "grpo.seq_len": 40}
    expected |= {"reward.seq_len": 56, "dpo.seq_len": 56, "pretrain.model.max_seq_len": 72}
    expected |= dict.fromkeys(pipeline_sizing.NEW_TOKEN_KEYS, 13)
    assert {k: get_key(sized, k) for k in expected} == expected
    assert len(changes) == len(expected)
    assert "sft.seq_len 32 -> 48" in changes and "pretrain.model.max_seq_len 64 -> 72" in changes
    assert demo().sft.seq_len == 32  # the preset itself is untouched


def test_lengths_only_grow_and_a_base_model_keeps_its_own_max_seq_len():
    c = demo()
    c.sft.seq_len, c.ppo.ppo.max_new_tokens = 200, 50
    sized, _ = pipeline_sizing.grow(c, DataLengths(sft=45, prompt=40, response=13), False)
    assert sized.sft.seq_len == 200 and sized.ppo.ppo.max_new_tokens == 50
    assert sized.rm_data.max_new_tokens == 13
    assert sized.pretrain.model.max_seq_len == 64  # no pretraining: not this run's to size


class CountingTokenizer:
    """One id per character, 2 per turn marker, 1 for bos and 1 for the assistant marker
    a generation prompt ends with: lengths are countable by hand."""

    def encode_chat(self, messages, add_generation_prompt=False):
        n = 1 + sum(len(m["content"]) + 2 for m in messages) + int(add_generation_prompt)
        return np.zeros(n, np.int32), np.zeros(n, bool)


def write_data(workdir: pathlib.Path, sft: list[tuple[str, str]], prompts: list[str]) -> None:
    p = data_paths(workdir)
    p["sft"].parent.mkdir(parents=True)
    rows = [json.dumps({"prompt": a, "response": b}) for a, b in sft]
    p["sft"].write_text("\n".join(rows[:-1]) + "\n")
    p["sft_eval"].write_text(rows[-1] + "\n")  # the longest lives in the eval split
    for key in ("prompts", "eval_prompts"):
        p[key].write_text("".join(json.dumps({"prompt": q}) + "\n" for q in prompts))


def test_measure_reads_every_split(tmp_path):
    write_data(tmp_path, [("ab", "c"), ("abcdef", "ghijklmnop")], ["abc", "abcdefg"])
    lengths = pipeline_sizing.measure(tmp_path, CountingTokenizer())
    # sft: 1 + (6 + 2) + (10 + 2) = 21 tokens, 20 row positions; prompt: 1 + 9 + 1 = 11;
    # response: 21 - (1 + 8 + 1) = 11 (its 10 characters, its markers, minus the
    # assistant marker the generation prompt already has).
    assert lengths == DataLengths(sft=20, prompt=11, response=11)


@pytest.mark.parametrize("task", ["repeat", "rotate"])
def test_sized_lengths_fit_every_record_of_a_task_through_its_tokenizer(tmp_path, task, capfd):
    from model.tokenizer import load_tokenizer
    from train.data import pipelines

    assert pipeline.main(["--workdir", str(tmp_path), "--config", f"{CONFIG}:tiny",
                          f"--config.task={task}", "--stages", "data,tokenizer"]) == 0  # fmt: skip
    config = pipeline_config.get_config("tiny")
    config.task = task
    sized = pipeline_sizing.size_to_data(config, tmp_path)
    tokenizer = load_tokenizer(data_paths(tmp_path)["tokenizer"])
    p = data_paths(tmp_path)
    sft = [json.loads(line) for line in p["sft"].read_text().splitlines()]
    prompts = [json.loads(line) for line in p["prompts"].read_text().splitlines()]

    def record(prompt, response=None):
        turns = [{"role": "user", "content": prompt}]
        turns += [] if response is None else [{"role": "assistant", "content": response}]
        return {"roles": [t["role"] for t in turns], "contents": [t["content"] for t in turns]}

    longest_sft = max(pipelines.record_length(record(**r), tokenizer, "sft") for r in sft)
    longest_prompt = max(
        pipelines.record_length(record(**r), tokenizer, "prompts") for r in prompts
    )
    assert longest_sft <= sized.sft.seq_len and longest_prompt <= sized.ppo.seq_len
    longest_answer = max(len(tokenizer.encode(r["response"])) + 1 for r in sft)  # + end of turn
    assert longest_answer <= sized.ppo.ppo.max_new_tokens == sized.rm_data.max_new_tokens
    if task == "repeat":  # answers of up to 12 characters: more than the preset's 10
        assert sized.ppo.ppo.max_new_tokens == 13
        assert "max_new_tokens 10 -> 13" in capfd.readouterr().err
    config.size_to_data = False
    assert pipeline_sizing.size_to_data(config, tmp_path) is config


@pytest.mark.parametrize("task", ["uppercase", "next_letter"])
def test_the_measured_tasks_run_exactly_as_the_demo_preset_says(tmp_path, task):
    """docs/rlhf.md's figures were measured before sizing: their runs are unchanged."""
    assert pipeline.main(["--workdir", str(tmp_path), "--config", f"{CONFIG}:demo",
                          f"--config.task={task}", "--stages", "data,tokenizer"]) == 0  # fmt: skip
    config = pipeline_config.get_config("demo")
    config.task = task
    assert pipeline_sizing.size_to_data(config, tmp_path).to_dict() == config.to_dict()


def test_the_pipeline_samples_answers_as_long_as_the_task_needs(tmp_path):
    """`repeat` answers run to 12 characters; the preset's 10 new tokens would cut them,
    so rm_data's samples, sized to 13, run longer than 10."""
    argv = ["--workdir", str(tmp_path), "--config", f"{CONFIG}:tiny", "--config.task=repeat"]
    assert pipeline.main([*argv, "--stages", "data,tokenizer,pretrain,sft,rm_data"]) == 0
    ranked = data_paths(tmp_path)["ranked"]
    groups = [json.loads(line) for line in ranked.read_text().splitlines()]
    longest = max(len(r) for g in groups for r in g["responses"])
    assert 10 < longest <= 13
    recorded = json.loads((tmp_path / "config.json").read_text())
    assert recorded["rm_data"]["max_new_tokens"] == 10  # the config as given is what is kept
