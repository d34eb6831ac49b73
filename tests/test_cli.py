"""The `flaxlm` command and the README's set-up commands."""

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

from orchestrate import cli

ROOT = pathlib.Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S)][:2]


def run_flaxlm(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, XLA_FLAGS="", PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "orchestrate.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_ci_runs_exactly_the_readme_test_command():
    install_and_run, install_and_test = readme_commands()
    assert install_and_run.startswith("pip install -e .")
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert install_and_test in ci


# Each command's `--help`, run through `flaxlm`'s dispatcher in one fresh process:
# {name: [exit status, stdout]}.
HELP_ALL = """
import contextlib, io, json, sys
from orchestrate import cli
results = {}
for name in cli.COMMANDS:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            code = cli.main([name, "--help"])
        except SystemExit as stop:
            code = stop.code
        except Exception as err:  # a broken entry point fails its own case only
            code = repr(err)
    results[name] = [code, out.getvalue()]
sys.stdout.write(json.dumps(results))
"""


@pytest.fixture(scope="module")
def command_help() -> dict[str, list]:
    env = dict(os.environ, XLA_FLAGS="", PYTHONPATH=str(ROOT))
    result = subprocess.run(
        [sys.executable, "-c", HELP_ALL],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout)


def test_help_lists_every_command():
    result = run_flaxlm("--help")
    assert result.returncode == 0
    listed = re.findall(r"^  (\S+)  ", result.stdout, flags=re.M)
    assert sorted(listed) == sorted(cli.COMMANDS)


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_every_command_prints_its_usage(command_help, name):
    code, out = command_help[name]
    assert code == 0, out
    assert out.startswith(f"usage: flaxlm {name} "), out[:200]


def test_readme_layout_names_every_module():
    """The README's layout section names every module of model/, train/, train/data/,
    rlhf/, orchestrate/ and configs/ on its directory's lines (model/hf*.py has lines of
    its own)."""
    layout = (ROOT / "README.md").read_text().split("\n## Layout\n")[1].split("\n## ")[0]
    lines: dict[str, str] = {}  # the directory a line starts with -> its text
    for block in re.split(r"\n    (?=\S)", layout)[1:]:
        label, _, rest = block.partition(" ")
        folder = "model" if label == "model/hf*.py" else label.rstrip("/")
        lines[folder] = lines.get(folder, "") + rest
    for folder in ("model", "train", "train/data", "rlhf", "orchestrate", "configs"):
        named = set(re.findall(r"\b\w+\.py\b", lines[folder]))
        files = {p.name for p in (ROOT / folder).glob("*.py") if p.name != "__init__.py"}
        assert sorted(files - named) == [], f"{folder}/: modules missing from README's layout"


def test_unknown_command_fails_with_usage():
    result = run_flaxlm("pretrian")
    assert result.returncode == 2
    assert "unknown command 'pretrian'" in result.stderr


def test_readme_first_command_is_the_pipeline_demo():
    """The README's first command installs and runs the demo pipeline (tests/test_readme.py
    runs it on the tiny pipeline's workdir)."""
    first = readme_commands()[0].split("&&")[1].split()
    assert first[:2] == ["flaxlm", "pipeline"]
    assert first[first.index("--config") + 1] == "configs/pipeline.py:demo"


def test_quicktrain_pulse():
    """`flaxlm quicktrain` for 3 steps trains and prints finite losses."""
    result = run_flaxlm("quicktrain", "--preset", "tiny", "--steps", "3")
    assert result.returncode == 0, result.stderr
    losses = [float(x) for x in re.findall(r"loss (\d+\.\d+)", result.stdout)]
    assert len(losses) >= 2 and all(map(lambda x: x == x, losses))


def test_cores_as_devices_flag_makes_one_device_per_core():
    """`--cores-as-devices 2` gives the command two CPU devices (quicktrain's default mesh
    takes them all); a bad count is one line naming the flag."""
    result = run_flaxlm("quicktrain", "--cores-as-devices", "2", "--steps", "2")
    assert result.returncode == 0, result.stderr
    assert "mesh {'data': 2, 'fsdp': 1, 'tensor': 1}" in result.stdout
    assert "2 cpu device(s)" in result.stdout
    for bad in ("--cores-as-devices=0", "--cores-as-devices"):
        result = run_flaxlm("quicktrain", bad)
        assert result.returncode == 2
        assert "--cores-as-devices" in result.stderr and "Traceback" not in result.stderr


def test_quicktrain_bad_mesh_is_one_clear_line():
    result = run_flaxlm("quicktrain", "--mesh", "3,1,1", "--steps", "1")
    assert result.returncode != 0
    assert "does not divide" in result.stderr and "Traceback" not in result.stderr
