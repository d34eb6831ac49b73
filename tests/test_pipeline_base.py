"""The pipeline on a base model imported from Hugging Face files (`init_from`): the
model's own byte-level BPE tokenizer and ChatML template, no tokenizer or pretrain stage;
SFT from the import, then rm_data, the reward model, PPO and GRPO (LoRA policies), DPO
and the report; the links without SFT (the reward model and RL start from the import
itself); and one line, exit 2, from every stage when the tokenizer has no chat template."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
from conftest import require
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from orchestrate import pipeline
from train.metrics import read_metrics
from train.parent import read_parent

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = f"{ROOT / 'configs' / 'pipeline.py'}:tiny"
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
RL_STAGES = ("reward", "ppo", "dpo", "grpo")


def write_tokenizer(directory: pathlib.Path, corpus: list[str], template: str | None) -> int:
    """A byte-level BPE tokenizer trained on the task's text, ChatML specials; its size."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([*corpus, "user\nassistant\nsystem\n"], trainer)
    directory.mkdir(parents=True)
    tok.save(str(directory / "tokenizer.json"))
    config = {"bos_token": None, "eos_token": "<|endoftext|>"}
    if template is not None:
        config["chat_template"] = template
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return tok.get_vocab_size()


def import_base(root: pathlib.Path, template: str | None) -> pathlib.Path:
    """A random 2-layer Llama with the tokenizer above, saved by transformers and imported."""
    transformers = require("transformers")
    from train import hf_cli

    corpus = PromptCheckingTask().pretraining_corpus(np.random.default_rng(0), 20)
    vocab = write_tokenizer(root / "hf", corpus, template)
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(root / "hf")
    hf_cli.import_hf(root / "hf", root / "imported")
    return root / "imported"


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> pathlib.Path:
    return import_base(tmp_path_factory.mktemp("base"), CHATML)


WORDS = ("cat", "dog", "bee", "owl", "ant", "elk", "ram", "yak")
WORDS += ("cod", "eel", "emu", "fox", "gnu", "hen", "jay", "koi")


class PromptCheckingTask:
    """A task whose oracle refuses a prompt it did not write: PPO and GRPO read each prompt
    back from the policy's tokens through the chat template, so a misread prompt (the role
    header or the generation prompt left in) stops the stage. Its score, the share of
    letters "a" in the first 8 characters, differs between an untrained model's samples."""

    PROMPTS = tuple(f"say {a} {b}" for a in WORDS[:8] for b in WORDS[8:])

    def prompts(self, rng: np.random.Generator, n: int) -> list[str]:
        return [self.PROMPTS[i] for i in rng.integers(0, len(self.PROMPTS), n)]

    def demonstration(self, prompt: str, rng: np.random.Generator) -> str:
        return "a " + prompt.split()[-1]

    def score(self, prompt: str, response: str) -> float:
        if prompt not in self.PROMPTS:
            raise ValueError(f"the oracle was given {prompt!r}, not a prompt of the task")
        return response[:8].count("a") / 8

    def pretraining_corpus(self, rng: np.random.Generator, n_docs: int) -> list[str]:
        return [" ".join(self.PROMPTS)] * n_docs


TASK = "--config.task=tests.test_pipeline_base:PromptCheckingTask"


def run(workdir: pathlib.Path, base: pathlib.Path, stages: str, *extra: str) -> int:
    argv = ["--config", TINY, "--workdir", str(workdir), f"--config.init_from={base}", TASK]
    argv += [f"--config.stages={stages}"]
    return pipeline.main([*argv, *extra])


def test_every_stage_runs_from_an_imported_model(tmp_path, base):
    workdir = tmp_path / "run"
    stages = "data,tokenizer,pretrain,sft,rm_data,reward,ppo,dpo,grpo,report"
    adapters = [f"--config.{s}.model.lora.rank=4" for s in ("ppo", "grpo")]  # LoRA pulses
    assert run(workdir, base, stages, *adapters) == 0
    assert not (workdir / "tokenizer").exists() and not (workdir / "pretrain").exists()
    fingerprint = read_parent(base).tokenizer_fingerprint
    assert read_parent(workdir / "sft").meta["lineage"]["parent"].startswith(str(base))
    for stage in ("sft", *RL_STAGES):
        assert read_parent(workdir / stage).tokenizer_fingerprint == fingerprint, stage
    for stage in RL_STAGES:
        parent = pathlib.Path(read_parent(workdir / stage).meta["lineage"]["parent"])
        assert parent.parent.parent == (workdir / "sft").resolve(), stage
    for stage in ("ppo", "grpo"):  # the oracle scored every rollout (and refused none)
        rows = read_metrics(workdir / stage)
        assert any("oracle_score" in r for r in rows), stage
        # LoRA policies: the checkpoint records the adapters, and they moved.
        assert read_parent(workdir / stage).meta["lora"]["rank"] == 4, stage
        assert all(r["update_norm"] > 0 for r in rows if "update_norm" in r), stage
        assert any("update_norm" in r for r in rows), stage
    summary = json.loads((workdir / "summary.json").read_text())
    for stage in ("base", "sft", "ppo", "dpo", "grpo"):  # base: the import before SFT
        assert f"{stage}_oracle_greedy" in summary, (stage, summary)
    assert summary["base_kl_to_sft"] > 0 and summary["sft_kl_to_sft"] == 0
    assert "| base |" in (workdir / "report.md").read_text()


def test_without_sft_the_stages_read_the_base_model(tmp_path, base):
    """Links only (no training): with no SFT run, rm_data's policy, the reward model and
    every RL stage start from the imported model; once SFT has run, from it."""
    from configs import pipeline as pipeline_config
    from orchestrate import pipeline_report, pipeline_stages

    config = pipeline_config.get_config("tiny")
    config.init_from = str(base)
    workdir = tmp_path / "run"
    assert pipeline_stages.start_policy(config, workdir) == base
    for stage in ("reward", "ppo", "dpo", "grpo"):
        linked = pipeline_stages.stage_config(config, stage, workdir)
        assert linked.init_from == str(base), stage
    assert pipeline_stages.stage_config(config, "sft", workdir).init_from == str(base)
    # The report's "sft" row is then the base model itself, and there is no "base" row.
    assert pipeline_report.compared_policies(config, workdir) == ["sft"]
    (workdir / "sft" / "checkpoints").mkdir(parents=True)
    assert pipeline_stages.stage_config(config, "ppo", workdir).init_from == str(workdir / "sft")
    assert pipeline_report.compared_policies(config, workdir) == ["base", "sft"]
    assert pipeline_report.policy_dir(config, workdir, "base") == base
    from train.stage import INIT_FROM_KINDS, check_parent_kind

    for stage in ("ppo", "dpo", "grpo"):  # an imported (instruct) model is a chat policy
        check_parent_kind(read_parent(base), "init_from", INIT_FROM_KINDS[stage])
    selected = pipeline.select_stages(config, None)
    assert "pretrain" not in selected and "tokenizer" not in selected
    assert pipeline.plan(config, ["data", "rm_data", "reward", "ppo"], {"stages": {}}, None)


def test_base_model_refusals(tmp_path, base, capsys):
    workdir = tmp_path / "run"
    argv = ["--config", TINY, "--workdir", str(workdir)]
    assert pipeline.main([*argv, f"--config.init_from={base}", "--stages", "data,pretrain"]) == 2
    assert "--stages pretrain with init_from" in capsys.readouterr().err
    missing = tmp_path / "nothing"
    assert pipeline.main([*argv, f"--config.init_from={missing}"]) == 2
    assert f"init_from={missing}: not a flaxlm run directory" in capsys.readouterr().err


@pytest.mark.parametrize("stage", ["sft", "reward", "dpo", "ppo"])
def test_chat_stage_without_a_template_is_one_line(tmp_path_factory, stage, capsys):
    """A checkpoint whose tokenizer has no chat template: every stage that starts from a
    checkpoint (SFT, reward, DPO; PPO and GRPO share the same start) stops with one line
    naming the tokenizer (exit 2), before reading data or training anything."""
    from orchestrate import cli

    root = tmp_path_factory.getbasetemp() / "no_template"
    base = root / "imported" if (root / "imported").is_dir() else import_base(root, None)
    rows = {
        "sft": {"prompt": "say cat fox", "response": "a fox"},
        "reward": {"prompt": "say cat fox", "responses": ["a fox", "no"], "ranking": [0, 1]},
        "ppo": {"prompt": "say cat fox"},
    }
    rows["dpo"] = rows["reward"]
    data = root / f"{stage}.jsonl"
    data.write_text(json.dumps(rows[stage]) + "\n")
    argv = [stage, "--config", f"{ROOT / 'configs' / stage}.py:tiny"]
    argv += ["--workdir", str(root / f"run_{stage}"), f"--config.init_from={base}"]
    argv += [f"--config.data.path={data}", "--config.data.name=", "--config.eval.every_steps=0"]
    argv += [f"--config.data.data_dir={root / 'tfds'}"]
    if stage == "reward":
        argv += [f"--config.calibration.prompts_path={root / 'ppo.jsonl'}"]
        (root / "ppo.jsonl").write_text(json.dumps(rows["ppo"]) + "\n")
    if stage == "ppo":  # reward_from is read after the policy's start
        argv += [f"--config.reward_from={base}"]
    capsys.readouterr()  # the import's progress bars
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no chat template" in err[0], err
