"""Workdir data never runs code: no module unpickles, evals, execs or yaml-loads what it
reads back, and workdirs with crafted JSON (config.json, pipeline.json, checkpoint meta,
an HF config.json with remote code) do not make any loader run code."""

from __future__ import annotations

import json
import pathlib
import re
import shutil

import pytest

from tests.faults import harness
from tests.faults.conftest import stage_args
from train.integrity import write_manifest

PACKAGES = ("model", "train", "rlhf", "configs")
# Constructs that turn data into code or objects.
DANGEROUS = re.compile(
    r"\bpickle\.|\bcPickle\b|\bdill\b|\bcloudpickle\b|\bmarshal\.loads|\bjsonpickle\b"
    r"|(?<![\w.])eval\(|(?<![\w.])exec\(|yaml\.load\(|yaml\.unsafe_load|allow_pickle\s*=\s*True"
    r"|torch\.load\(|shelve\.|trust_remote_code\s*=\s*True|__import__\("
)
# Code execution that reads user-named *code* files given on the command line (never
# workdir data): `--config FILE.py` and an ablation file are Python by design.
ALLOWED_EXEC = {
    "configs/loader.py": "exec_module of the --config file (a command-line argument)",
    "orchestrate/sweep.py": "exec_module of the --config ablation file (a command-line argument)",
}


def test_no_module_deserializes_data_into_code():
    expect = "no pickle/eval/exec/yaml.load/torch.load on data; exec_module only for --config"
    hits, execs = [], []
    for package in PACKAGES:
        for path in sorted((harness.ROOT / package).rglob("*.py")):
            rel = str(path.relative_to(harness.ROOT))
            for number, line in enumerate(path.read_text().splitlines(), 1):
                code = line.split("#", 1)[0]
                if DANGEROUS.search(code) and not code.strip().startswith(('"', "'")):
                    hits.append(f"{rel}:{number}: {line.strip()}")
                if "exec_module" in code:
                    execs.append(rel)
    with harness.case(
        "security",
        "all",
        "grep: pickle/eval/exec/yaml.load/torch.load",
        f"{len(PACKAGES)} packages",
        expect,
    ) as info:
        info["detail"] = f"{len(hits)} hits; exec_module in {sorted(set(execs))}"
        assert not hits, hits
        assert set(execs) <= set(ALLOWED_EXEC), sorted(set(execs) - set(ALLOWED_EXEC))


def payloads(marker: pathlib.Path) -> dict:
    """Values that would run code (touch `marker`) if any loader evaluated them."""
    shell = f"touch {marker}"
    return {
        "python": f"__import__('os').system('{shell}')",
        "yaml": f"!!python/object/apply:os.system ['{shell}']",
        "jsonpickle": {"py/reduce": [{"py/function": "os.system"}, {"py/tuple": [shell]}]},
        "task": "os:system",
        "__class__": "subprocess.Popen",
    }


def crafted_stage_workdir(source: pathlib.Path, target: pathlib.Path, marker: pathlib.Path) -> None:
    """A copy of a finished run with every JSON it holds laced with payloads. The crafter
    rewrites each checkpoint's integrity.json too (it guards against damage, not against
    whoever can write the workdir), so the loader really reads the crafted JSON."""
    shutil.copytree(source, target)
    evil = payloads(marker)
    config = json.loads((target / "config.json").read_text())
    config.update(evil)
    (target / "config.json").write_text(json.dumps(config))
    for meta in (target / "checkpoints").glob("*/meta/metadata"):
        data = json.loads(meta.read_text())
        data["config"] = {**(data.get("config") or {}), **evil}
        data["lineage"] = {**(data.get("lineage") or {}), **evil}
        meta.write_text(json.dumps(data))
        write_manifest(meta.parent.parent)


@pytest.mark.slow
@pytest.mark.parametrize("command", ["sft", "pretrain-as-parent"])
def test_crafted_workdir_runs_no_code(command, chain, tmp_path):
    """Resuming a crafted SFT workdir, and starting an SFT run from a crafted parent."""
    marker = tmp_path / "PWNED"
    crafted = tmp_path / "crafted"
    p = chain["paths"]
    if command == "sft":
        crafted_stage_workdir(chain["sft"], crafted, marker)
        workdir, parent = crafted, chain["pretrain"]
    else:
        crafted_stage_workdir(chain["pretrain"], crafted, marker)
        workdir, parent = tmp_path / "child", crafted
    args = stage_args(
        "sft.py",
        workdir,
        chain["tfds"],
        f"--config.init_from={parent}",
        f"--config.data.path={p['sft']}",
        "--config.eval.every_steps=0",
        "--config.total_steps=10",
        "--config.stop_at_step=1",
    )
    expect = "no code runs (marker file absent); the JSON is read as data"
    fault = "crafted config.json + checkpoint meta" + (" (parent)" if workdir != crafted else "")
    with harness.case(
        "security", "sft", fault, "resume" if workdir == crafted else "init_from", expect
    ) as info:
        result = harness.run_capture("sft", args)
        info["detail"] = f"exit {result.returncode}; marker absent: {not marker.exists()}"
        assert not marker.exists(), "a payload ran"


def test_crafted_pipeline_state_runs_no_code(tmp_path):
    marker = tmp_path / "PWNED"
    workdir = tmp_path / "run"
    workdir.mkdir()
    evil = payloads(marker)
    (workdir / "config.json").write_text(json.dumps(evil))
    state = {"stages": {"data": {"done": True, "config": evil}}, **evil}
    (workdir / "pipeline.json").write_text(json.dumps(state))
    args = [
        "--config",
        f"{harness.CONFIGS / 'pipeline.py'}:tiny",
        "--workdir",
        str(workdir),
        "--stages",
        "data",
    ]
    expect = "no code runs; a changed stage config is refused by name"
    with harness.case(
        "security", "pipeline", "crafted pipeline.json + config.json", "rerun", expect
    ) as info:
        result = harness.run_capture("pipeline", args)
        last = result.stderr.strip().splitlines()[-1][-160:] if result.stderr.strip() else ""
        info["detail"] = f"exit {result.returncode}: {last}"
        assert not marker.exists(), "a payload ran"
        assert result.returncode == 2 and "--from-stage data" in result.stderr, last


def test_crafted_hf_directory_runs_no_code(tmp_path):
    """`import-hf` of a directory whose config.json asks for remote code."""
    marker = tmp_path / "PWNED"
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "modeling_evil.py").write_text(f"import os\nos.system('touch {marker}')\n")
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "auto_map": {"AutoModelForCausalLM": "modeling_evil.EvilModel"},
        **payloads(marker),
    }
    (hf / "config.json").write_text(json.dumps(config))
    (hf / "pytorch_model.bin").write_bytes(b"\x80\x04cos\nsystem\n.")  # a pickle: refused
    workdir = tmp_path / "out"
    expect = "refused with one line; no code runs; no workdir"
    with harness.case(
        "security", "import-hf", "remote-code config.json + pickled .bin", "import", expect
    ) as info:
        result = harness.run_capture("import-hf", ["--hf", str(hf), "--workdir", str(workdir)])
        err = result.stderr.strip()
        info["detail"] = f"exit {result.returncode}: {err.splitlines()[-1][-160:] if err else ''}"
        assert not marker.exists(), "a payload ran"
        assert result.returncode != 0, "accepted"
        assert "Traceback" not in err, f"a traceback, not one line: {err.splitlines()[-1]}"
        assert not workdir.exists()
