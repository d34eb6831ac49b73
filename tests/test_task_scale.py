"""A task's `preset_scale`: the pipeline multiplies the preset's counts the task names,
keeps command-line values as given, and refuses a scale that names no count."""

import json
import pathlib

import numpy as np
import pytest

from configs import pipeline as pipeline_config
from orchestrate import pipeline, pipeline_sizing
from orchestrate.workdir import data_paths
from rlhf.tasks import Addition

CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "pipeline.py"
DEMO = f"{CONFIG}:demo"


def parsed(*argv: str):
    return pipeline.parse_args(["--config", DEMO, "--workdir", "unused", *argv])[1]


def test_factors_multiply_the_named_counts_and_nothing_else():
    demo = pipeline_config.get_config("demo")
    scales = {"data.n_sft": 10, "sft.total_steps": 0.25, "reward.total_steps": 1.5}
    sized, changes = pipeline_sizing.scale_to_task(demo, scales, explicit=(), task="t")
    # By hand: 2000 x 10; 600 x 0.25; 125 x 1.5 = 187.5, rounded to even: 188.
    assert (sized.data.n_sft, sized.sft.total_steps, sized.reward.total_steps) == (20000, 150, 188)
    assert changes == [
        "data.n_sft 2000 -> 20000",
        "sft.total_steps 600 -> 150",
        "reward.total_steps 125 -> 188",
    ]
    untouched = {k: v for k, v in sized.to_dict().items() if k not in ("data", "sft", "reward")}
    assert untouched == {k: v for k, v in demo.to_dict().items() if k in untouched}
    assert demo.data.n_sft == 2000  # a copy: the given config is unchanged


def test_a_key_given_on_the_command_line_is_not_scaled():
    demo = pipeline_config.get_config("demo")
    scales = {"data.n_sft": 10, "sft.total_steps": 4}
    sized, changes = pipeline_sizing.scale_to_task(demo, scales, {"sft.total_steps"}, "t")
    assert (sized.data.n_sft, sized.sft.total_steps) == (20000, 600)
    assert changes == ["data.n_sft 2000 -> 20000"]


def test_a_small_factor_leaves_at_least_one():
    demo = pipeline_config.get_config("tiny")
    sized, _ = pipeline_sizing.scale_to_task(demo, {"ppo.total_steps": 0.01}, (), "t")
    assert sized.ppo.total_steps == 1


@pytest.mark.parametrize(
    ("scales", "words"),
    [
        ({"sft.total_stpes": 2}, ["task t", "'sft.total_stpes'", "not a pipeline key"]),
        ({"nosection.steps": 2}, ["'nosection.steps'", "not a pipeline key"]),
        ({"sft.optim.lr": 2}, ["'sft.optim.lr'", "not a count"]),
        ({"size_to_data": 2}, ["'size_to_data'", "not a count"]),
        ({"sft.total_steps": 0}, ["preset_scale['sft.total_steps'] = 0", "positive"]),
        ({"sft.total_steps": "2"}, ["'2'", "positive"]),
        ({"sft.total_steps": True}, ["True", "positive"]),
    ],
)
def test_a_scale_that_is_not_a_positive_factor_of_a_count_is_refused(scales, words):
    with pytest.raises(ValueError) as err:
        pipeline_sizing.scale_to_task(pipeline_config.get_config("demo"), scales, (), "t")
    for word in words:
        assert word in str(err.value)


def test_the_pipeline_runs_rotate_with_its_own_counts():
    """The sizes docs/rlhf.md's rotate rows ran with (they were command-line values then)."""
    config = parsed("--config.task=rotate")
    assert config.data.n_sft == 20000 and config.data.n_docs == 2000
    assert config.pretrain.total_steps == 1200 and config.sft.total_steps == 2400
    assert parsed("--config.task=next_letter").pretrain.total_steps == 1200


def test_command_line_values_and_size_to_task_false_win(capfd):
    config = parsed("--config.task=rotate", "--config.sft.total_steps=100")
    assert config.sft.total_steps == 100 and config.data.n_sft == 20000
    err = capfd.readouterr().err
    assert "sized to the task rotate" in err and "data.n_sft 2000 -> 20000" in err
    assert "sft.total_steps" not in err
    plain = parsed("--config.task=rotate", "--config.size_to_task=false")
    expected = pipeline_config.get_config("demo")
    expected.task, expected.size_to_task = "rotate", False
    assert plain.to_dict() == expected.to_dict()


@pytest.mark.parametrize("task", ["uppercase", "brackets", "repeat", "subtraction"])
def test_a_task_without_a_scale_runs_the_preset_as_given(task):
    expected = pipeline_config.get_config("demo")
    expected.task = task
    assert parsed(f"--config.task={task}").to_dict() == expected.to_dict()


class MisScaledTask(Addition):
    """A third-party task whose scale names a key the pipeline lacks."""

    preset_scale = {"sft.steps": 2}  # noqa: RUF012


def test_the_pipeline_names_a_bad_scale_and_runs_nothing(tmp_path, capfd):
    argv = ["--workdir", str(tmp_path / "run"), "--config", DEMO]
    task = "--config.task=tests.test_task_scale:MisScaledTask"
    assert pipeline.main([*argv, task]) == 2
    err = capfd.readouterr().err
    assert "MisScaledTask" in err and "'sft.steps'" in err and "not a pipeline key" in err
    assert not (tmp_path / "run").exists()


def test_the_recorded_config_holds_the_counts_that_ran(tmp_path):
    run = tmp_path / "run"
    argv = ["--workdir", str(run), "--config", f"{CONFIG}:tiny", "--config.task=rotate"]
    assert pipeline.main([*argv, "--stages", "data"]) == 0
    recorded = json.loads((run / "config.json").read_text())
    assert recorded["data"]["n_sft"] == 2000  # tiny's 200 x 10
    fingerprint = json.loads((run / "pipeline.json").read_text())["stages"]["data"]["config"]
    assert fingerprint["data"]["n_sft"] == 2000
    sft_rows = data_paths(run)["sft"].read_text().splitlines()
    assert len(sft_rows) == 2000
    assert np.all([json.loads(r)["prompt"].startswith("rotate ") for r in sft_rows])
    # Resuming with the same command finds the stage finished (same fingerprint).
    assert pipeline.main([*argv, "--stages", "data"]) == 0
