"""Every command in README.md is exercised, so the docs cannot drift from the code.

Commands are the README's lines that start with `flaxlm`, `pip` or `tensorboard` (in
```bash blocks or indented blocks; backslash continuations joined). Each `flaxlm` command
must name a real subcommand and, for configured stages, a config whose preset and
override keys exist. The cheap ones then run in tiny mode, in README order: `runs/demo`
is a copy of the tiny pipeline's workdir, other `runs/` paths live in a temporary
directory, `:demo` presets become `:tiny`, and training stages stop after 2 steps.
"""

from __future__ import annotations

import builtins
import pathlib
import re
import runpy
import shlex
import shutil

import pytest

from configs import loader
from orchestrate import cli

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Commands that are parsed and checked but not run here, and why: by first word, and by a
# piece of the command line.
NOT_RUN_PROGRAMS = {
    "pip": "the install commands: .ci/run runs the README's test command verbatim",
    "tensorboard": "TensorBoard is not a dependency; event files are tested in test_pretrain",
}
NOT_RUN_PIECES = {
    "--from-stage": "reruns PPO: --from-stage is tested in tests/test_pipeline.py",
    "--config.task=sort": "a second whole pipeline: tasks are tested in test_pipeline/test_tasks",
    "runs/all": "a whole pipeline with DPO and GRPO: their stages run in the chain below",
    "pretrain.py:1b": "compiles the 1B preset: tests/test_multihost.py runs that AOT check",
    "ablation_activation": "a 6-run sweep: sweeps and reports are tested in test_sweep.py",
    "--cores-as-devices": "sets XLA_FLAGS before JAX starts: tests/test_cli.py runs it afresh",
    "runs/human": "a server that runs until stopped: tests/test_label*.py run the human path",
    "runs/smollm": "the 98 MB SmolLM2 file: import, sample and chat run in tests/test_gguf.py; "
    "every stage from an imported model in tests/test_pipeline_base.py",
}


def readme_commands() -> list[str]:
    lines = (ROOT / "README.md").read_text().splitlines()
    commands, i = [], 0
    while i < len(lines):
        line = lines[i].strip()
        if re.match(r"(flaxlm|pip|tensorboard) ", line):
            while line.endswith("\\"):
                i += 1
                line = line[:-1].rstrip() + " " + lines[i].strip()
            commands.append(line)
        i += 1
    return commands


def skip_reason(command: str) -> str | None:
    program = command.split()[0]
    if program in NOT_RUN_PROGRAMS:
        return NOT_RUN_PROGRAMS[program]
    return next((why for piece, why in NOT_RUN_PIECES.items() if piece in command), None)


def test_readme_lists_the_commands_a_newcomer_needs():
    text = " ".join(readme_commands())
    for name in (
        "pipeline",
        "pretrain",
        "sft",
        "reward",
        "ppo",
        "dpo",
        "grpo",
        "sample",
        "chat",
        "tokenizer",
        "export-hf",
        "import-hf",
        "score",
    ):
        assert f"flaxlm {name} " in text, name


@pytest.mark.parametrize("command", [c for c in readme_commands() if c.startswith("flaxlm")])
def test_every_readme_command_parses(command: str):
    argv = shlex.split(command)[1:]
    assert argv[0] in cli.COMMANDS, f"README: unknown command {argv[0]!r}"
    rest, overrides = loader.split_argv(argv[1:])
    if "--config" in rest:
        spec = rest[rest.index("--config") + 1]
        if argv[0] == "sweep":  # an ablation file, not a config
            module = runpy.run_path(str(ROOT / spec))
            assert module["get_ablation"](None)["arms"], spec
        else:
            loader.load(str(ROOT / spec), overrides)  # raises naming an unknown preset or key


def localize(command: str, demo: pathlib.Path, runs: pathlib.Path) -> list[str]:
    """The README command with its paths and presets made tiny and local (prepared TFDS
    files included: the default data_dir is in the home directory)."""
    text = command.replace("runs/demo", str(demo)).replace("runs/", f"{runs}/")
    text = text.replace(":demo", ":tiny").replace("configs/", f"{ROOT}/configs/")
    argv = shlex.split(text)[1:]
    if argv[0] in ("pretrain", "sft", "reward", "ppo", "dpo", "grpo"):
        argv += ["--config.total_steps=2", "--config.optim.warmup_steps=0"]
        argv += ["--config.eval.every_steps=0"]
        argv += [f"--config.data.data_dir={runs / 'tfds'}"]
    if argv[0] == "pretrain":  # shakespeare_char's 12 rows do not split over 8 fake devices
        argv += ["--config.batch_size=16"]
    if argv[0] == "sample":
        argv += ["--max-new-tokens", "8"]
    return argv


def test_readme_commands_run(tiny_pipeline, tmp_path, monkeypatch, capsys):
    demo = tmp_path / "demo"
    shutil.copytree(tiny_pipeline, demo)
    runs = tmp_path / "runs"
    monkeypatch.chdir(tmp_path)
    typed = iter(["47+38"])

    def fake_input(prompt: str = "") -> str:
        try:
            return next(typed)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr(builtins, "input", fake_input)
    ran = []
    for command in readme_commands():
        if skip_reason(command):
            continue
        argv = localize(command, demo, runs)
        code = cli.main(argv)
        out = capsys.readouterr()
        assert code == 0, f"README command failed ({code}): {command}\n{out.err[-2000:]}"
        ran.append(argv[0])
    assert ran.count("pipeline") == 1 and "chat" in ran and "import-hf" in ran
    assert (runs / "alone" / "grpo" / "metrics.jsonl").is_file()
    assert (runs / "imported" / "checkpoints").is_dir()
