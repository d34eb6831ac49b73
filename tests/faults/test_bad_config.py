"""Bad configs and arguments for every command: unknown keys, wrong types, impossible
meshes, a vocabulary that does not fit the tokenizer or the checkpoint, init_from /
reward_from pointing at the wrong kind of stage or at nothing.

Expectation: one line naming the key or path, a non-zero exit, and the workdir never
created. Run in this process (each fails before any compile), through `orchestrate.cli.main`."""

from __future__ import annotations

import pathlib

import pytest

from tests.faults import harness
from tests.rl_chain import stage_args

EXPECT = "one line naming the key/path; non-zero exit; workdir not created"


def argv_for(command: str, chain: dict, workdir: pathlib.Path, *extra: str) -> list[str]:
    """A valid invocation of `command` (plus `extra`) on the session's chain."""
    p = chain["paths"]
    chain = {"pretrain": "", "sft": "", "reward": "", **chain}  # task_data: no trained runs
    base = {
        "pretrain": (
            "pretrain.py",
            "--config.data.name=",
            "--config.eval.name=",
            f"--config.data.path={p['pretrain']}",
        ),
        "sft": (
            "sft.py",
            f"--config.init_from={chain['pretrain']}",
            f"--config.data.path={p['sft']}",
            "--config.eval.every_steps=0",
        ),
        "reward": (
            "reward.py",
            f"--config.init_from={chain['sft']}",
            f"--config.data.path={p['ranked']}",
            "--config.eval.every_steps=0",
            f"--config.calibration.prompts_path={p['eval_prompts']}",
        ),
        "ppo": (
            "ppo.py",
            f"--config.init_from={chain['sft']}",
            f"--config.reward_from={chain['reward']}",
            f"--config.data.path={p['prompts']}",
        ),
        "dpo": (
            "dpo.py",
            f"--config.init_from={chain['sft']}",
            f"--config.data.path={p['ranked']}",
        ),
        "grpo": (
            "grpo.py",
            f"--config.init_from={chain['sft']}",
            f"--config.reward_from={chain['reward']}",
            f"--config.data.path={p['prompts']}",
        ),
    }
    if command == "pipeline":
        return [
            command,
            "--config",
            f"{harness.CONFIGS / 'pipeline.py'}:tiny",
            "--workdir",
            str(workdir),
            *extra,
        ]
    config, *links = base[command]
    # Two steps: a refusal costs nothing, and a wrongly accepted run ends quickly.
    links += ["--config.total_steps=2", "--config.optim.warmup_steps=0"]
    return [command, *stage_args(config, workdir, chain["tfds"], *links, *extra)]


CI_COMMANDS = ("pretrain", "pipeline")
STAGES = ("pretrain", "sft", "reward", "ppo", "dpo", "grpo")
# (fault, commands, extra args, text the message must hold)
CASES = [
    ("unknown key", (*STAGES,), ("--config.optim.lrr=1",), "optim.lrr"),
    ("unknown key", ("pipeline",), ("--config.ppo.kl.betta=1",), "kl.betta"),
    ("wrong type", (*STAGES,), ("--config.total_steps=ten",), "expected int"),
    ("infinite integer", (*STAGES,), ("--config.total_steps=inf",), "total_steps"),
    ("wrong type", ("pipeline",), ("--config.sft.batch_size=1.5",), "expected int"),
    ("impossible mesh", (*STAGES,), ("--config.mesh.data=3",), "mesh.data=3"),
    ("impossible mesh", (*STAGES,), ("--config.mesh.preset=v9-1024",), "v9-1024"),
    ("non-finite learning rate", (*STAGES,), ("--config.optim.lr=nan",), "optim.lr"),
    ("unknown stage", ("pipeline",), ("--stages", "data,bogus"), "bogus"),
    ("vocab smaller than the tokenizer", ("pretrain",), ("--config.model.vocab_size=8",), "vocab"),
    (
        "vocab differs from the checkpoint",
        ("sft", "reward", "ppo", "dpo", "grpo"),
        ("--config.model.vocab_size=1024",),
        "model.vocab_size",
    ),
]


def cases() -> list:
    out = []
    for fault, commands, extra, message in CASES:
        out += [
            pytest.param(
                c,
                fault,
                extra,
                message,
                id=f"{c}-{fault}",
                marks=() if c in CI_COMMANDS else pytest.mark.slow,
            )
            for c in commands
        ]
    return out


def check_one_line(
    command: str,
    fault: str,
    point: str,
    argv: list[str],
    message: str,
    workdir: pathlib.Path,
    capsys,
) -> None:
    from orchestrate import cli

    capsys.readouterr()  # drop what fixtures printed (e.g. building the chain)
    with harness.case("config", command, fault, point, EXPECT) as info:
        code = cli.main(argv)
        err = capsys.readouterr().err.strip()
        info["detail"] = f"exit {code}: " + (err.splitlines()[-1][-150:] if err else "(silent)")
        assert code != 0, "accepted"
        assert message in err, f"message lacks {message!r}: {err[-300:]}"
        # One error line (TFDS's progress bars, if data was prepared first, are not errors).
        errors = [line for line in err.splitlines() if "error" in line.lower()]
        assert len(errors) == 1 and "Traceback" not in err, err[-500:]
        assert not workdir.exists(), "the workdir was created"


@pytest.mark.parametrize("command, fault, extra, message", cases())
def test_bad_config_is_one_line(command, fault, extra, message, request, tmp_path, capsys):
    # The later stages need the trained chain (slow); pretrain and the pipeline do not.
    chain = request.getfixturevalue("task_data" if command in CI_COMMANDS else "chain")
    workdir = tmp_path / "run"
    argv = argv_for(command, chain, workdir, *extra)
    check_one_line(command, fault, " ".join(extra)[:60], argv, message, workdir, capsys)


# (command, the key, points at, the message must hold)
WRONG_KIND = [
    ("sft", "init_from", "reward", "init_from"),
    ("reward", "init_from", "empty", "init_from"),
    ("ppo", "reward_from", "sft", "reward_from"),
    ("ppo", "init_from", "reward", "init_from"),
    ("dpo", "init_from", "reward", "init_from"),
    ("grpo", "reward_from", "pretrain", "reward_from"),
    ("sft", "init_from", "missing", "init_from"),
]


@pytest.mark.slow
@pytest.mark.parametrize("command, key, target, message", WRONG_KIND)
def test_link_to_the_wrong_kind_of_stage(command, key, target, message, chain, tmp_path, capsys):
    paths = {"empty": tmp_path / "empty", "missing": tmp_path / "nowhere"}
    paths["empty"].mkdir()
    workdir = tmp_path / "run"
    where = paths.get(target, chain.get(target))
    argv = argv_for(command, chain, workdir, f"--config.{key}={where}")
    fault = f"{key} -> a {target} workdir" if target in chain else f"{key} -> {target} dir"
    check_one_line(command, fault, f"{key}={target}", argv, message, workdir, capsys)


@pytest.mark.parametrize("key, text", [("total_steps", "inf"), ("optim.lr", "nan")])
def test_non_finite_overrides_are_config_errors(key, text):
    """Regression: `inf` for an int raised OverflowError (a traceback) and `nan` for a
    float passed every `<= 0` check."""
    from configs import loader

    config = loader.load_config_file(f"{harness.CONFIGS / 'pretrain.py'}:tiny")
    with pytest.raises(loader.ConfigError, match=key):
        loader.apply_overrides(config, [f"{key}={text}"])
