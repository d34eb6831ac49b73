"""Several processes on 127.0.0.1 (fake CPU devices, gloo collectives) behave like several
hosts: same losses as one process on the same global mesh and batches, checkpoints that
move between 1 and 2 processes with the exact data position, SIGTERM to one process
stopping all, clear errors for a missing peer or disagreeing configs, mesh presets and
the ahead-of-time compile check.

The one-process reference reads the same global batches as N processes: its
GlobalDataIterator holds the N shard iterators (shard i of N) that the N processes
hold one each, so 1 and N processes feed identical rows to the same 8-device mesh.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import loader, meshes
from model import sharding as sh
from model.config import get_preset, param_count
from model.transformer import Transformer
from train import aot, distributed, pretrain
from train.checkpoint import Checkpointer, abstract_with_shardings
from train.data import pipelines
from train.metrics import read_metrics
from train.optim import optimizer_from_config
from train.stage import parse_stage_args, run_stage
from train.state import state_shardings

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "pretrain.py")
TOTAL = 40
COMMON = [
    f"--config.total_steps={TOTAL}",
    "--config.log.every_steps=1",
    "--config.eval.every_steps=0",
    "--config.checkpoint.every_steps=0",
    "--config.log.peak_flops_per_device=1e12",  # no matmul timing at start-up
]
KEYS = ("loss", "grad_norm", "lr", "num_tokens")


# ------------------------------------------------------------------ helpers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stage_args(workdir, data_dir, *overrides) -> list[str]:
    return [
        "--config",
        f"{CONFIG}:tiny",
        "--workdir",
        str(workdir),
        f"--config.data.data_dir={data_dir}",
        *COMMON,
        *overrides,
    ]


def launch(n, argv_of, logdir, pids=None, timeout=120, module=True) -> list[subprocess.Popen]:
    """Start `flaxlm ARGV` (or `python ARGV` if not module) as processes `pids` (default
    all) of n on 127.0.0.1, with 8 // n fake devices each."""
    port = free_port()
    env = dict(
        os.environ,
        PYTHONPATH=str(ROOT),
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={8 // n}",
    )
    procs = []
    for pid in range(n) if pids is None else pids:
        flags = ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(n)]
        flags += ["--process-id", str(pid), "--init-timeout", str(timeout)]
        argv = argv_of(pid)
        out = open(pathlib.Path(logdir) / f"process{pid}.log", "w")  # noqa: SIM115
        cmd = [sys.executable, "-m", "orchestrate.cli", argv[0], *flags, *argv[1:]]
        procs.append(
            subprocess.Popen(
                cmd if module else [sys.executable, *argv, *flags],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    return procs


def finish(procs, logdir, timeout=300) -> list[tuple[int, str]]:
    results = []
    for pid, proc in enumerate(procs):
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        results.append((proc.returncode, (pathlib.Path(logdir) / f"process{pid}.log").read_text()))
    return results


def train_lines(workdir) -> dict[int, dict]:
    out: dict[int, dict] = {}
    for line in read_metrics(workdir):
        out.setdefault(line["step"], {}).update({k: line[k] for k in KEYS if k in line})
    return out


def virtual_build(config, workdir, shards: int):
    """pretrain.build, but one process reads all `shards` shards (see the module doc)."""
    parts = pretrain.build(config, workdir)
    source = pretrain.open_text(config, "data")
    iterators = []
    for index in range(shards):
        options = pipelines.DataOptions(
            seed=config.seed, shard_index=index, shard_count=shards,
            num_workers=config.data.num_workers,
        )  # fmt: skip
        dataset = pipelines.pretrain_dataset(
            source, parts.tokenizer, config.batch_size // shards, config.seq_len, options,
            config.data.packing, text_key=config.data.text_key,
        )  # fmt: skip
        iterators.append(iter(dataset))
    parts.batches = distributed.GlobalDataIterator(iterators)
    return parts


def run_virtual(workdir, data_dir, shards, *overrides) -> int:
    """One in-process run (this process's 8 devices) standing in for `shards` processes."""
    _, config = parse_stage_args("pretrain", stage_args(workdir, data_dir, *overrides))
    return run_stage("pretrain", workdir, config, lambda: virtual_build(config, workdir, shards))


def restore_state(workdir):
    """The newest checkpoint's (step, state, data) restored onto this process's 8 devices."""
    config = ml_collections.ConfigDict(
        json.loads((pathlib.Path(workdir) / "config.json").read_text())
    )
    mesh, rules = sh.make_mesh(-1, 1, 1), sh.get_rules("fsdp")
    model = Transformer(loader.model_config(config))
    tx, _ = optimizer_from_config(config)
    abstract, shardings = state_shardings(model, tx, mesh, rules)
    checkpointer = Checkpointer(workdir)
    step, restored, data, _ = checkpointer.restore(abstract_with_shardings(abstract, shardings))
    checkpointer.close()
    return step, restored, data


def assert_same_lines(got: dict, want: dict, steps) -> None:
    for step in steps:
        for key in KEYS:
            np.testing.assert_allclose(
                got[step][key], want[step][key], rtol=2e-6, err_msg=f"step {step} {key}"
            )


# ------------------------------------------------------------------ pure parts


def test_plan_from_flags_env_and_slurm():
    plan = distributed.plan_from(
        {"coordinator": "10.0.0.1:1234", "num_processes": "4", "process_id": "3"}, {}
    )
    assert plan.initialize and plan.coordinator == "10.0.0.1:1234"
    assert (plan.num_processes, plan.process_id, plan.source) == (4, 3, "flags/env")
    env = {"FLAXLM_COORDINATOR": "h:1", "FLAXLM_NUM_PROCESSES": "2", "FLAXLM_PROCESS_ID": "1"}
    assert distributed.plan_from({"process_id": "0"}, env).process_id == 0  # flags win
    assert not distributed.plan_from({}, {}).initialize  # one host: nothing to do
    assert not distributed.plan_from({}, {**env, "FLAXLM_DISTRIBUTED": "off"}).initialize
    slurm = {"SLURM_NTASKS": "3", "SLURM_PROCID": "2", "SLURM_JOB_ID": "20007"}
    slurm["SLURM_JOB_NODELIST"] = "gpu[007-009]"
    plan = distributed.plan_from({}, slurm)
    assert (plan.coordinator, plan.num_processes, plan.process_id) == ("gpu007:20007", 3, 2)
    assert distributed.plan_from({}, {}, on_tpu_vm=True).coordinator is None  # JAX detects
    assert distributed.first_slurm_host("a1,b2") == "a1"
    assert distributed.first_slurm_host("n[12,15-16],m3") == "n12"
    flags, rest = distributed.pop_flags(["--num-processes", "2", "--config=x", "--process-id=1"])
    assert flags == {"num_processes": "2", "process_id": "1"} and rest == ["--config=x"]


@pytest.mark.parametrize(
    "flags, message",
    [
        ({"num_processes": "2", "process_id": "0"}, "need --coordinator"),
        ({"coordinator": "h:1", "num_processes": "2", "process_id": "2"}, "must be in 0..1"),
        ({"coordinator": "h", "num_processes": "2", "process_id": "0"}, "expected HOST:PORT"),
        ({"mode": "on"}, "choose from"),
        ({"init_timeout": "0"}, "must be >= 1"),
    ],
)
def test_bad_distributed_settings_are_one_line(flags, message):
    with pytest.raises(distributed.StartupError, match=message):
        distributed.plan_from(flags, {})


def test_mesh_presets_use_every_device_and_apply_to_configs():
    for name, p in meshes.MESH_PRESETS.items():
        assert p.data * p.fsdp * p.tensor == p.devices, name
        assert p.devices % p.hosts == 0 and p.strategy in sh.RULES and p.why, name
    args = ["--config", f"{CONFIG}:1b", "--workdir", "x", "--config.mesh.preset=v5e-256"]
    config = parse_stage_args("pretrain", [*args, "--config.mesh.fsdp=32"])[1]
    assert (config.mesh.data, config.mesh.fsdp, config.mesh.tensor) == (16, 32, 1)  # flag wins
    with pytest.raises(loader.ConfigError, match=r"mesh\.preset=.v9-8.: unknown"):
        parse_stage_args("pretrain", [*args[:-1], "--config.mesh.preset=v9-8"])
    assert "| v5e-16 | 16 | 4 |" in meshes.preset_table()
    assert meshes.preset_table() in (ROOT / "tpu_scripts" / "README.md").read_text()


def test_mismatch_message_names_key_and_process():
    trees = [{"optim": {"lr": 3e-3}, "seed": 0}, {"optim": {"lr": 3e-3}, "seed": 0}]
    trees.append({"optim": {"lr": 1e-3}, "seed": 0})
    text = distributed.describe_mismatch(trees)
    assert "optim.lr: process 0 has 0.003, process 2 has 0.001" in text
    assert "process 1" not in text


class _Counter:
    """A minimal grain-like iterator: yields its position."""

    def __init__(self, start: int = 0) -> None:
        self.i = start

    def __next__(self):
        self.i += 1
        return {"x": np.array([self.i])}

    def get_state(self):
        return {"i": self.i}

    def set_state(self, state):
        self.i = state["i"]


def test_data_position_of_another_process_count_is_refused_or_reset(capsys):
    two = distributed.GlobalDataIterator([_Counter(), _Counter(10)])
    assert next(two)["x"].tolist() == [1, 11]
    saved = json.loads(json.dumps(two.get_state()))
    assert saved == {"process_count": 2, "processes": [{"i": 1}, {"i": 11}]}
    again = distributed.GlobalDataIterator([_Counter(), _Counter()])
    again.set_state(saved)
    assert next(again)["x"].tolist() == [2, 12]
    one = distributed.GlobalDataIterator([_Counter()])
    with pytest.raises(distributed.DataStateError, match=r"saved by 2 process.*this run has 1"):
        one.set_state(saved)
    one_reset = distributed.GlobalDataIterator([_Counter()], reset=True)
    one_reset.set_state(saved)
    assert next(one_reset)["x"].tolist() == [1] and "reset_position" in capsys.readouterr().err
    one.set_state({"i": 5})  # a checkpoint from before the multi-process format
    assert next(one)["x"].tolist() == [6]


# ------------------------------------------------------------------ processes


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
    """TOTAL steps in one process, reading the global batches of 2 processes, with a
    checkpoint at step 10 that the next test starts from."""
    workdir = tmp_path_factory.mktemp("reference")
    keep = ["--config.checkpoint.every_steps=10", "--config.checkpoint.max_to_keep=9"]
    assert run_virtual(workdir, data_dir, 2, *keep) == 0
    return workdir


def test_1_to_2_to_1_processes_same_losses_exact_resume_and_sigterm(tmp_path, data_dir, reference):
    """1 process (steps 1-10) -> 2 processes (11-k, stopped by SIGTERM to process 1 only)
    -> 1 process (k+1-40): every step equals the uninterrupted 1-process reference."""
    workdir, logs = tmp_path / "run", tmp_path
    shutil.copytree(reference, workdir)  # the reference as it was after step 10
    for path in (workdir / "checkpoints").iterdir():
        if path.name != "10":
            shutil.rmtree(path)
    metrics = workdir / "metrics.jsonl"
    metrics.write_text(
        "".join(f"{json.dumps(x)}\n" for x in read_metrics(workdir) if x["step"] <= 10)
    )

    procs = launch(2, lambda pid: ["pretrain", *stage_args(workdir, data_dir)], logs)
    deadline = time.time() + 240
    while time.time() < deadline and all(p.poll() is None for p in procs):
        if len(metrics.read_text().splitlines()) >= 13:  # steps 11-13 of this run logged
            break
        time.sleep(0.1)
    procs[1].send_signal(signal.SIGTERM)
    (code0, log0), (code1, log1) = finish(procs, logs)
    assert (code0, code1) == (128 + signal.SIGTERM, 128 + signal.SIGTERM), log0[-3000:]
    stopped = [int(log.split("SIGTERM at step ")[1].split(":")[0]) for log in (log0, log1)]
    assert stopped[0] == stopped[1] and 13 <= stopped[0] < TOTAL, stopped
    assert "resuming from checkpoint step 10" in log0
    checkpointer = Checkpointer(workdir)
    assert checkpointer.latest_step() == stopped[0]
    data = checkpointer.manager.restore(
        stopped[0], args=ocp.args.Composite(data=ocp.args.JsonRestore())
    )["data"]
    checkpointer.close()
    assert data["process_count"] == 2
    assert [s["pipeline"]["shard_index"] for s in data["processes"]] == [0, 1]

    assert run_virtual(workdir, data_dir, 2) == 0  # the 2-process checkpoint in 1 process
    got, want = train_lines(workdir), train_lines(reference)
    assert sorted(got) == list(range(1, TOTAL + 1))
    assert_same_lines(got, want, range(1, TOTAL + 1))
    (step_a, a, _), (step_b, b, _) = restore_state(workdir), restore_state(reference)
    assert step_a == step_b == TOTAL
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)


def test_missing_process_is_a_clear_error_in_bounded_time(tmp_path, data_dir):
    start = time.time()
    argv = ["pretrain", *stage_args(tmp_path, data_dir)]
    procs = launch(2, lambda pid: argv, tmp_path, pids=[0], timeout=5)  # process 1 never starts
    ((code, log),) = finish(procs, tmp_path, timeout=120)
    assert code == distributed.START_FAILED_EXIT, log[-2000:]
    assert "could not reach all peers through the coordinator 127.0.0.1:" in log
    assert "within 5 s" in log and "Traceback" not in log
    assert time.time() - start < 60


def test_hosts_with_different_configs_stop_naming_the_key(tmp_path, data_dir):
    def argv(pid):
        lr = ["--config.optim.lr=0.001"] if pid == 1 else []
        return ["pretrain", *stage_args(tmp_path / "run", data_dir, *lr)]

    results = finish(launch(2, argv, tmp_path), tmp_path, timeout=240)
    for code, log in results:
        assert code == 2, log[-2000:]
        assert "optim.lr: process 0 has 0.003, process 1 has 0.001" in log, log[-2000:]
    assert not (tmp_path / "run").exists()


def report_figure(out: str, name: str) -> float:
    """One GiB figure of `flaxlm compile`'s memory table."""
    return float(out.split(f"\n  {name}")[1].split()[0])


def test_compile_check_1b_on_8_fake_devices(capsys, monkeypatch):
    """1b on v5e-8 (the preset's grad_accum 64): the figures add up, the state is exactly
    fp32 AdamW split over 8 devices, the verdict is "fits" by the 90% bound computed here;
    the same report against a 4 GiB device is "does not fit", exit 1."""
    compiled = []
    compile_step = aot.compile_train_step

    def compile_once(config):  # the second run reuses the first compile (same program)
        if not compiled:
            compiled.append(compile_step(config))
        return compiled[0]

    monkeypatch.setattr(aot, "compile_train_step", compile_once)
    args = ["--config", f"{CONFIG}:1b", "--fake-devices", "8", "--config.mesh.preset=v5e-8"]
    code = aot.main(args)
    out = capsys.readouterr().out
    assert "memory per device (GiB)" in out and "on 8 cpu devices" in out, out
    assert "grad_accum 64" in out, out
    fig = {k: report_figure(out, k) for k in ("params", "optimizer", "arguments", "peak")}
    fig |= {k: report_figure(out, k) for k in ("outputs", "temporaries")}
    aliased = float(out.split("(aliased with donated arguments: ")[1].split(")")[0])
    fp32_shard = param_count(get_preset("1b")) * 4 / 8 / 2**30  # fp32, split over 8
    assert fig["params"] == pytest.approx(fp32_shard, abs=1e-3)
    assert fig["optimizer"] == pytest.approx(2 * fp32_shard, abs=2e-3)  # AdamW: mu and nu
    assert fig["arguments"] >= fig["params"] + fig["optimizer"] - 2e-3
    live = fig["arguments"] + fig["outputs"] - aliased + fig["temporaries"]
    assert fig["peak"] >= live - 2e-3  # generated code only adds to it
    budget = 0.9 * meshes.get_mesh_preset("v5e-8").hbm_gib  # --usable-fraction's default
    assert fig["peak"] <= budget, out  # measured 5.8 GiB of a 14.4 GiB budget
    assert code == 0 and "\nFITS: " in out and "DOES NOT FIT" not in out, out
    assert "[limit from mesh.preset=v5e-8]" in out

    limit = 4.0  # below the measured peak: the same program must not fit
    assert fig["peak"] > 0.9 * limit
    code = aot.main([*args, "--device-memory-gib", str(limit)])
    out = capsys.readouterr().out
    assert code == 1, out
    assert f"DOES NOT FIT: {fig['peak']:.2f} GiB needed, {limit:.1f} GiB per device" in out, out
    assert "[limit from --device-memory-gib]" in out and "\nFITS" not in out
    assert len(compiled) == 1


UNEVEN_SHARDS = """
import sys
import jax, numpy as np
from train import distributed
distributed.start(sys.argv[1:])
from model import sharding as sh
from train.data import pipelines as pl
mesh, rules = sh.make_mesh(-1, 1, 1), sh.get_rules("fsdp")
pid = jax.process_index()
mine = [{"loss_mask": np.ones((4, 2), np.float32)} for _ in range(3 if pid == 0 else 1)]
total = jax.jit(lambda b: b["loss_mask"].sum())
sums = [float(total(pl.make_global_batch(b, mesh, rules))) for b in distributed.in_step(mine)]
print("sums", sums)
"""


def test_uneven_eval_shards_step_together(tmp_path):
    """Shards of 3 and 1 batches: both processes run 3 global steps, the short one
    feeding zero batches (without in_step, process 0 would hang in its second step)."""
    procs = launch(2, lambda pid: ["-c", UNEVEN_SHARDS], tmp_path, timeout=60, module=False)
    for code, log in finish(procs, tmp_path, timeout=120):
        assert code == 0, log[-2000:]
        assert "sums [16.0, 8.0, 8.0]" in log, log[-2000:]


@pytest.mark.slow
def test_four_processes_match_one(tmp_path, data_dir):
    """4 processes x 2 devices = the 1-process run reading the same 4 shards."""
    assert run_virtual(tmp_path / "one", data_dir, 4, "--config.total_steps=6") == 0
    procs = launch(
        4,
        lambda pid: [
            "pretrain",
            *stage_args(tmp_path / "four", data_dir, "--config.total_steps=6"),
        ],
        tmp_path,
    )
    for code, log in finish(procs, tmp_path, timeout=600):
        assert code == 0, log[-3000:]
    assert_same_lines(train_lines(tmp_path / "four"), train_lines(tmp_path / "one"), range(1, 7))


# ------------------------------------------------------------------ RLHF across processes

PPO_KEYS = ("rm_score", "oracle_score", "kl", "policy_loss", "value_loss", "entropy")
PPO_KEYS += ("response_length", "approx_kl", "clip_fraction")


def ppo_stage_args(chain: dict, workdir, data_dir) -> list[str]:
    from tests.rl_chain import stage_args as chain_args

    return chain_args(
        "ppo.py",
        workdir,
        data_dir,
        f"--config.init_from={chain['sft']}",
        f"--config.reward_from={chain['reward']}",
        f"--config.data.path={chain['paths']['prompts']}",
        f"--config.eval.path={chain['paths']['eval_prompts']}",
        "--config.task=addition",
        "--config.total_steps=3",
        "--config.eval.every_steps=3",
        "--config.checkpoint.every_steps=0",
        "--config.log.every_steps=1",
        "--config.log.peak_flops_per_device=1e12",
    )


def virtual_ppo_build(config, workdir, shards: int):
    """ppo.build, but one process reads the prompt shards of `shards` processes."""
    from rlhf import ppo
    from train.sft import data_options, open_records

    parts = ppo.build(config, workdir)
    source = open_records(config, "data", "prompts")
    mesh = sh.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    options = data_options(config, mesh, sh.get_rules(config.mesh.strategy), train=True)
    iterators = []
    for index in range(shards):
        shard = dataclasses.replace(options, shard_index=index, shard_count=shards)
        dataset = pipelines.prompts_dataset(
            source, parts.tokenizer, config.batch_size // shards, config.seq_len, shard
        )
        iterators.append(iter(dataset))
    parts.batches = distributed.GlobalDataIterator(iterators)
    return parts


def test_two_processes_ppo_matches_one(tmp_path, rl_chain):
    """PPO's rollouts (sampling, the host-side oracle on gathered texts), scoring, learning
    and eval on 2 processes x 4 devices equal the 1-process run on the same 8-device mesh
    reading the same 2 prompt shards; only process 0 writes the metrics. The 2 processes
    share an empty data_dir: process 0 prepares the prompt files, then the other reads
    them (preparing at once, they collide on TFDS's final rename)."""
    one, two = tmp_path / "one", tmp_path / "two"
    _, config = parse_stage_args("ppo", ppo_stage_args(rl_chain, one, rl_chain["tfds"]))
    assert run_stage("ppo", one, config, lambda: virtual_ppo_build(config, one, 2)) == 0
    fresh = tmp_path / "tfds"
    procs = launch(2, lambda pid: ["ppo", *ppo_stage_args(rl_chain, two, fresh)], tmp_path)
    for code, log in finish(procs, tmp_path, timeout=600):
        assert code == 0, log[-3000:]
    want, got = read_metrics(one), read_metrics(two)
    assert [x["step"] for x in got] == [x["step"] for x in want]  # one writer, no duplicates
    train = [(a, b) for a, b in zip(want, got, strict=True) if "rm_score" in a]
    assert [a["step"] for a, _ in train] == [1, 2, 3]
    for a, b in train:
        for key in PPO_KEYS:
            np.testing.assert_allclose(b[key], a[key], rtol=1e-4, atol=1e-5, err_msg=key)
    evals = [(a, b) for a, b in zip(want, got, strict=True) if "eval_oracle_score" in a]
    assert len(evals) == 1
    for a, b in evals:
        for key in (k for k in a if k.startswith("eval_") and isinstance(a[k], float)):
            np.testing.assert_allclose(b[key], a[key], rtol=1e-4, atol=1e-5, err_msg=key)


# ------------------------------------------------------------------ tpu_scripts


def run_script(tmp_path, *argv, env=None):
    """A tpu_scripts command with a `gcloud` on PATH that fails loudly if ever called."""
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    (fake / "gcloud").write_text("#!/bin/sh\necho REAL-GCLOUD-CALLED >&2\nexit 99\n")
    (fake / "gcloud").chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{fake}:{os.environ['PATH']}",
        "TPU_ZONE": "zone-a",
        **(env or {}),
    }
    return subprocess.run(
        ["bash", *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )


def test_tpu_scripts_dry_run_print_the_gcloud_commands(tmp_path):
    scripts = ROOT / "tpu_scripts"
    out = run_script(tmp_path, scripts / "create.sh", "--type", "v5e-16", "--spot", "--queued",
                     "--dry-run")  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "queued-resources create flaxlm --zone=zone-a --node-id=flaxlm" in out.stdout
    assert "--accelerator-type=v5litepod-16 --runtime-version=v2-alpha-tpuv5-lite --spot" in (
        out.stdout
    )
    assert "(4 worker(s))" in out.stdout
    out = run_script(tmp_path, scripts / "launch.sh", "--run", "r1", "--dry-run", "--",
                     "flaxlm", "pretrain", "--workdir", "$HOME/runs/r1")  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "tpu-vm ssh flaxlm --zone=zone-a --worker=all" in out.stdout
    assert "nohup setsid flaxlm pretrain --workdir $HOME/runs/r1" in out.stdout
    out = run_script(tmp_path, scripts / "teardown.sh", "--name", "x", "--project", "p",
                     "--dry-run")  # fmt: skip
    assert "tpu-vm delete x --zone=zone-a --project=p --quiet" in out.stdout
    out = run_script(tmp_path, scripts / "slurm.sbatch", "flaxlm", "pretrain", env={"DRY_RUN": "1"})
    assert "FLAXLM_PROCESS_ID=\\$SLURM_PROCID" in out.stdout and "flaxlm pretrain" in out.stdout
    out = run_script(tmp_path, scripts / "create.sh")  # no --dry-run: gcloud is called
    assert "REAL-GCLOUD-CALLED" in out.stderr  # (the fake one)
    out = run_script(tmp_path, scripts / "sync.sh", "--to-bucket", "--dry-run")
    assert out.returncode == 2 and "set --bucket gs://BUCKET" in out.stderr


@pytest.mark.skipif(not shutil.which("shellcheck"), reason="shellcheck is not installed")
def test_tpu_scripts_are_shellcheck_clean():
    scripts = [*sorted((ROOT / "tpu_scripts").glob("*.sh")), ROOT / "tpu_scripts/slurm.sbatch"]
    result = subprocess.run(
        ["shellcheck", "-x", "-P", "SCRIPTDIR", *map(str, scripts)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout
