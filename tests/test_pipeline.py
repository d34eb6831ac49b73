"""`flaxlm pipeline` on the tiny preset: every stage's outputs and the report, figures that
come from metrics.jsonl, skipping finished stages, --stages / --from-stage, refusing a
changed config, a task from outside the repository, and SIGTERM mid-stage + rerun giving
the same final figures as the uninterrupted run."""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from configs import pipeline as pipeline_config
from orchestrate import pipeline, pipeline_report, pipeline_stages
from train.metrics import read_metrics

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = f"{ROOT / 'configs' / 'pipeline.py'}:tiny"
TRAINING = ("pretrain", "sft", "reward", "ppo")


def run_pipeline(workdir: pathlib.Path, *extra: str) -> int:
    return pipeline.main(["--config", TINY, "--workdir", str(workdir), *extra])


def cli(workdir: pathlib.Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    """The pipeline in a child process (its own JAX runtime and signal handlers)."""
    command = [sys.executable, "-m", "orchestrate.cli", "pipeline", "--config", TINY]
    return subprocess.Popen(
        [*command, "--workdir", str(workdir), *extra],
        cwd=ROOT,
        env=env or os.environ.copy(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.fixture
def finished(tiny_pipeline: pathlib.Path) -> pathlib.Path:
    return tiny_pipeline  # tests/conftest.py; the tests here leave its outputs as they were


def test_every_stage_writes_its_outputs(finished: pathlib.Path):
    p = pipeline_stages.data_paths(finished)
    for name in ("pretrain", "sft", "sft_eval", "prompts", "eval_prompts", "ranked"):
        assert p[name].is_file() and p[name].stat().st_size > 0, name
    assert (p["tokenizer"] / "tokenizer.model").is_file()
    for stage in TRAINING:
        assert (finished / stage / "config.json").is_file(), stage
        assert read_metrics(finished / stage), stage
        assert list((finished / stage / "checkpoints").iterdir()), stage
    assert (finished / "reward" / "reward_calibration.json").is_file()
    for png in ("pretrain", "sft", "reward", "ppo"):
        assert (finished / "report" / f"{png}.png").stat().st_size > 1000
    state = json.loads((finished / pipeline.STATE_FILE).read_text())
    stages = pipeline_config.DEFAULT_STAGES.split(",")
    assert all(state["stages"][s]["done"] for s in stages)


def test_lineage_links_each_stage_to_the_previous(finished: pathlib.Path):
    from train.parent import read_parent

    for stage, parent in (("sft", "pretrain"), ("reward", "sft"), ("ppo", "sft")):
        lineage = read_parent(finished / stage).meta["lineage"]
        assert pathlib.Path(lineage["parent"]).parent.parent == (finished / parent).resolve()
    ppo_lineage = read_parent(finished / "ppo").meta["lineage"]
    assert (
        pathlib.Path(ppo_lineage["reward_model"]).parent.parent == (finished / "reward").resolve()
    )


def test_report_figures_come_from_metrics(finished: pathlib.Path):
    report = (finished / "report.md").read_text()
    rows = re.findall(r"^\| (\w+) \| [^|]+ \| `(\w+)` \| ([^|]+) \|$", report, re.M)
    assert len(rows) >= 6
    for stage, key, text in rows:
        logged = [r[key] for r in read_metrics(finished / stage) if key in r]
        assert float(text.replace(",", "")) == pytest.approx(logged[-1], rel=1e-3), (stage, key)
    summary = json.loads((finished / "summary.json").read_text())
    for stage, figures in pipeline_report.KEY_FIGURES.items():
        if not (finished / stage / "metrics.jsonl").is_file():  # an optional stage
            continue
        for _, key in figures:
            logged = [r[key] for r in read_metrics(finished / stage) if key in r]
            if logged:  # e.g. no held-out reward eval when every held-out group tied
                assert summary[f"{stage}_{key}"] == logged[-1], (stage, key)
    assert summary["pretrain_loss"] and summary["ppo_kl"] is not None
    assert 0.0 <= summary["sft_oracle_sampled"] <= 1.0
    assert summary["ppo_oracle_gain"] == pytest.approx(
        summary["ppo_oracle_sampled"] - summary["sft_oracle_sampled"]
    )
    line = json.loads((finished / "metrics.jsonl").read_text())
    assert line == {"step": 0, **summary}
    assert "![ppo](report/ppo.png)" in report


def test_report_checks_each_stage_against_its_target(finished: pathlib.Path):
    from orchestrate import pipeline_checks
    from orchestrate.workdir import data_paths, read_prompts
    from rlhf.tasks import load_task

    summary = json.loads((finished / "summary.json").read_text())
    prompts = read_prompts(data_paths(finished)["eval_prompts"])
    teacher = pipeline_checks.teacher_level(load_task("uppercase"), prompts, seed=0)
    assert summary["teacher_oracle"] == pytest.approx(teacher)
    assert 0.0 < teacher < 1.0  # the imperfect teacher, right about half the time
    sft_met = summary["sft_oracle_sampled"] >= teacher - pipeline_checks.SFT_TOLERANCE
    assert summary["sft_target_met"] == float(sft_met)
    sft, ppo = summary["sft_oracle_sampled"], summary["ppo_oracle_sampled"]
    if sft < 1.0 - pipeline_checks.NOTHING_TO_CLOSE:
        assert summary["ppo_gap_closed"] == pytest.approx((ppo - sft) / (1.0 - sft))
    assert summary["ppo_target_met"] in (0.0, 1.0)
    report = (finished / "report.md").read_text()
    section = report.split("## Stage checks")[1].split("## ")[0]
    rows = re.findall(r"^\| (\w+) \| [^|]+ \| [^|]+ \| (yes|no) \|", section, re.M)
    assert dict(rows)["sft"] == ("yes" if sft_met else "no")
    assert dict(rows)["ppo"] == ("yes" if summary["ppo_target_met"] else "no")


def test_rerun_skips_finished_stages(finished: pathlib.Path, capfd):
    before = (finished / "pretrain" / "metrics.jsonl").read_text()
    assert run_pipeline(finished, "--stages", "data,tokenizer,pretrain") == 0
    assert "already finished: data, tokenizer, pretrain" in capfd.readouterr().err
    assert (finished / "pretrain" / "metrics.jsonl").read_text() == before


def test_changed_config_of_a_finished_stage_is_refused(finished: pathlib.Path, capfd):
    state = (finished / pipeline.STATE_FILE).read_text()
    code = run_pipeline(finished, "--config.pretrain.optim.lr=0.5")
    err = capfd.readouterr().err
    assert code == 2
    assert "stage pretrain finished with another config (pretrain.optim.lr changed)" in err
    assert "--from-stage pretrain" in err
    assert (finished / pipeline.STATE_FILE).read_text() == state


def test_a_key_added_after_the_run_is_not_a_change():
    current = {"seed": 0, "pretrain": {"optim": {"lr": 1e-3, "ns_steps": 5}}}
    recorded = {"seed": 0, "pretrain": {"optim": {"lr": 1e-3}}}  # from before ns_steps
    assert pipeline.changed_keys(pipeline.with_added_keys(recorded, current), current) == []
    current["pretrain"]["optim"]["ns_steps"] = 3  # not the old behaviour: a change
    filled = pipeline.with_added_keys(recorded, current)
    assert pipeline.changed_keys(filled, current) == ["pretrain.optim.ns_steps"]
    assert "ns_steps" not in recorded["pretrain"]["optim"]  # the record is not modified
    current["pretrain"]["optim"]["new_key"] = 1  # unknown additions are still changes
    assert "pretrain.optim.new_key" in pipeline.changed_keys(filled, current)


def test_from_stage_moves_old_outputs_aside(finished: pathlib.Path):
    old = (finished / "tokenizer" / "tokenizer.model").read_bytes()
    assert run_pipeline(finished, "--stages", "tokenizer", "--from-stage", "tokenizer") == 0
    replaced = list((finished / "replaced").glob("tokenizer-*"))
    assert len(replaced) == 1
    assert (replaced[0] / "tokenizer.model").read_bytes() == old
    assert (finished / "tokenizer" / "tokenizer.model").read_bytes() == old  # same seed


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--stages", "sft"], "stage sft needs pretrain, which has not run"),
        (["--stages", "data,polish"], "unknown stage(s) ['polish']"),
        (["--config.rm_data.k=1"], "rm_data.k=1"),
        (["--config.task=nowhere:Task"], "cannot import module 'nowhere'"),
        (["--config.ppo.kl.betta=1"], "ppo.kl.betta"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capfd, extra, message):
    workdir = tmp_path / "run"
    assert run_pipeline(workdir, *extra) == 2
    err = capfd.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not workdir.exists()


def test_stage_configs_are_linked(tmp_path):
    config = pipeline_config.get_config("tiny")
    config.task = "my_tasks:Echo"
    for stage in ("ppo", "dpo", "grpo"):
        c = pipeline_stages.stage_config(config, stage, tmp_path)
        assert c.task == "my_tasks:Echo" and c.init_from == str(tmp_path / "sft")
        assert c.seed == config.seed
    reward = pipeline_stages.stage_config(config, "reward", tmp_path)
    assert reward.reward.max_responses == config.rm_data.k
    assert reward.data.path == str(tmp_path / "rm_data" / "ranked.jsonl")


def test_smollm2_preset_needs_a_base_model(tmp_path, capfd):
    preset = f"{ROOT / 'configs' / 'pipeline.py'}:smollm2"
    workdir = tmp_path / "run"
    assert pipeline.main(["--config", preset, "--workdir", str(workdir)]) == 2
    err = capfd.readouterr().err.strip()
    assert "pass --config.init_from=DIR" in err and len(err.splitlines()) == 1, err
    assert not workdir.exists()


def test_smollm2_preset_trains_lora_stages_from_the_base(tmp_path):
    config = pipeline_config.get_config("smollm2")
    config.init_from = str(tmp_path / "base")
    assert pipeline.select_stages(config, None) == [
        "data", "sft", "rm_data", "reward", "ppo", "dpo", "grpo", "report"
    ]  # fmt: skip
    assert config.task == "brief"
    assert pipeline_stages.stage_config(config, "sft", tmp_path).init_from == config.init_from
    for stage in ("sft", "reward", "ppo", "dpo", "grpo"):
        assert config[stage].model.lora.rank == 8
    # The mean reward read is the char model's (docs/rlhf.md); SmolLM2 reads the last token.
    assert config.reward.reward.pool == "last"
    assert pipeline_config.get_config("demo").reward.reward.pool == "mean"


TASK_MODULE = '''
import numpy as np

class Echo:
    """Repeat the word; the teacher drops its last letter half the time."""

    def prompts(self, rng, n):
        return ["echo " + "".join(rng.choice(list("abc"), 3)) for _ in range(n)]

    def demonstration(self, prompt, rng):
        word = prompt.split()[1]
        return word if rng.random() < 0.5 else word[:-1]

    def score(self, prompt, response):
        return float(response.strip() == prompt.split()[1])

    def pretraining_corpus(self, rng, n_docs):
        return ["\\n".join(f"{p} = {self.demonstration(p, rng)}" for p in self.prompts(rng, 4))
                for _ in range(n_docs)]
'''


def test_a_task_from_outside_the_repository(tmp_path):
    (tmp_path / "my_tasks.py").write_text(TASK_MODULE)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    workdir = tmp_path / "run"
    proc = cli(workdir, "--stages", "data,tokenizer", "--config.task=my_tasks:Echo", env=env)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    prompts = pipeline_stages.read_prompts(workdir / "data" / "prompts.jsonl")
    assert prompts and all(p.startswith("echo ") for p in prompts)
    assert "echo" in (workdir / "data" / "pretrain.txt").read_text()


def copy_until(source: pathlib.Path, target: pathlib.Path, last_kept: str) -> None:
    """A workdir holding `source`'s stages up to `last_kept` (inclusive), as if the later
    ones had never run."""
    stages = list(pipeline_config.ALL_STAGES)
    kept = stages[: stages.index(last_kept) + 1]
    target.mkdir(parents=True)
    for name in ("data", "tokenizer", "rm_data", *TRAINING):
        if name in kept:
            shutil.copytree(source / name, target / name)
    state = json.loads((source / pipeline.STATE_FILE).read_text())
    state["stages"] = {s: v for s, v in state["stages"].items() if s in kept}
    (target / pipeline.STATE_FILE).write_text(json.dumps(state))


def test_sigterm_mid_stage_then_rerun_matches(finished: pathlib.Path, tmp_path):
    workdir = tmp_path / "run"
    copy_until(finished, workdir, "reward")
    first_checkpoint = workdir / "ppo" / "checkpoints" / "2"
    proc = cli(workdir)
    deadline = time.monotonic() + 600
    while not first_checkpoint.is_dir() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, out
    state = json.loads((workdir / pipeline.STATE_FILE).read_text())
    assert not state["stages"]["ppo"]["done"]
    proc = cli(workdir)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    assert "already finished: data, tokenizer, pretrain, sft, rm_data, reward" in out

    def figures(run: pathlib.Path) -> list[dict]:
        keep = ("step", "loss", "rm_score", "kl", "oracle_score", "eval_oracle_score")
        return [{k: r[k] for k in keep if k in r} for r in read_metrics(run / "ppo")]

    assert figures(workdir) == figures(finished)
    summary, expected = (json.loads((w / "summary.json").read_text()) for w in (workdir, finished))
    timing_free = {k: v for k, v in expected.items() if "tokens_per_sec" not in k}
    assert {k: summary[k] for k in timing_free} == timing_free


def test_greedy_answers_with_line_breaks_and_pipes_stay_in_their_cells():
    """A bulleted answer holds newlines, which would end a markdown table row."""
    from orchestrate.pipeline_report import greedy_section

    class Task:
        def score(self, prompt: str, response: str) -> float:
            return 0.5

    greedy = {"sft": ["1. Dog\n2. Cat"], "dpo": ["- Dog\r\n- a|b"]}
    lines = greedy_section(Task(), ["List two animals."], greedy, 4)
    rows = [line for line in lines if line.startswith("| `")]
    assert rows == ["| `List two animals.` | `1. Dog↵2. Cat` (0.50) | `- Dog↵- a\\|b` (0.50) |"]
    assert all(line.startswith("|") for line in lines if line and not line.startswith("#"))
