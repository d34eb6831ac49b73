"""`flaxlm pretrain` end to end: outputs, exact resume, preemption, damaged checkpoints,
mesh-change restore, non-finite stop and config errors."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import pytest

from configs import loader
from model import sharding as sh
from model.transformer import Transformer
from train import pretrain
from train.checkpoint import Checkpointer, abstract_with_shardings
from train.metrics import read_metrics
from train.optim import make_optimizer
from train.state import create_train_state

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "pretrain.py")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("tfds"))


def args(workdir, data_dir, *overrides, preset="tiny"):
    return [
        "--config",
        f"{CONFIG}:{preset}",
        "--workdir",
        str(workdir),
        f"--config.data.data_dir={data_dir}",
        *overrides,
    ]


def run(workdir, data_dir, *overrides) -> int:
    return pretrain.main(args(workdir, data_dir, *overrides))


def subprocess_pretrain(workdir, data_dir, *overrides) -> subprocess.Popen:
    # Same 8 fake devices as this process (conftest), so in- and out-of-process runs of
    # one config reduce in the same order and agree bitwise.
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen(
        [sys.executable, "-m", "orchestrate.cli", "pretrain", *args(workdir, data_dir, *overrides)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def train_lines(workdir) -> dict[int, dict]:
    """step -> the deterministic training metrics of that step (timings dropped)."""
    keep = ("loss", "grad_norm", "lr", "num_tokens", "eval_loss")
    out: dict[int, dict] = {}
    for line in read_metrics(workdir):
        out.setdefault(line["step"], {}).update({k: line[k] for k in keep if k in line})
    return out


def restore_params(workdir, mesh_shape=(1, 1, 1), strategy="dp"):
    saved = json.loads((pathlib.Path(workdir) / "config.json").read_text())
    cfg = loader.model_config(ml_collections.ConfigDict(saved))
    mesh = sh.make_mesh(*mesh_shape, devices=jax.devices()[: int(np.prod(mesh_shape))])
    rules = sh.get_rules(strategy)
    tx, _ = make_optimizer(lr=1e-3, total_steps=10)
    state, shardings = create_train_state(Transformer(cfg), tx, mesh, rules, seed=0)
    abstract = abstract_with_shardings(jax.eval_shape(lambda: state), shardings)
    checkpointer = Checkpointer(workdir)
    step, restored, data_state, meta = checkpointer.restore(abstract)
    checkpointer.close()
    return step, restored, data_state, meta


def test_pulse_writes_every_output(tmp_path, data_dir):
    assert (
        run(
            tmp_path,
            data_dir,
            "--config.total_steps=3",
            "--config.optim.warmup_steps=1",
            "--config.log.every_steps=1",
            "--config.eval.every_steps=3",
            "--config.eval.sample_prompt=ROMEO:",
            "--config.eval.sample_tokens=8",
        )
        == 0
    )
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["total_steps"] == 3 and config["model"]["preset"] == "tiny"
    lines = read_metrics(tmp_path)
    train = [x for x in lines if "loss" in x]
    assert [x["step"] for x in train] == [1, 2, 3]
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_sec", "mfu"):
        assert all(key in x for x in train), key
    assert any("eval_loss" in x for x in lines)
    assert any(x.get("sample", "").startswith("ROMEO:") for x in lines)
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert (tmp_path / "tokenizer" / "tokenizer.model").is_file()
    step, _, data_state, meta = restore_params(tmp_path)
    assert step == 3 and data_state
    assert meta["stage"] == "pretrain" and meta["lineage"]["stage"] == "pretrain"
    assert meta["tokenizer"]["path"] == "tokenizer" and "git_revision" in meta["lineage"]


def test_resume_is_bitwise_identical(tmp_path, data_dir):
    common = [
        "--config.total_steps=20",
        "--config.log.every_steps=1",
        "--config.checkpoint.every_steps=0",
        "--config.eval.every_steps=0",
    ]
    assert run(tmp_path / "straight", data_dir, *common) == 0
    assert run(tmp_path / "split", data_dir, *common, "--config.stop_at_step=10") == 0
    assert restore_params(tmp_path / "split")[0] == 10
    assert run(tmp_path / "split", data_dir, *common) == 0
    straight, split = train_lines(tmp_path / "straight"), train_lines(tmp_path / "split")
    assert sorted(split) == list(range(1, 21))
    assert straight == split  # every logged float equal, data order and RNG included
    a, b = restore_params(tmp_path / "straight")[1], restore_params(tmp_path / "split")[1]
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_a_stop_between_log_steps_leaves_the_same_metric_lines(tmp_path, data_dir):
    """Stopping at step 6 of 8 with a line every 4 steps checkpoints there, but logs no
    line for step 6: the resumed run's metrics.jsonl has the straight run's steps."""
    common = [
        "--config.total_steps=8",
        "--config.log.every_steps=4",
        "--config.checkpoint.every_steps=0",
        "--config.eval.every_steps=0",
    ]
    assert run(tmp_path / "straight", data_dir, *common) == 0
    assert run(tmp_path / "split", data_dir, *common, "--config.stop_at_step=6") == 0
    assert restore_params(tmp_path / "split")[0] == 6
    assert [x["step"] for x in read_metrics(tmp_path / "split")] == [4]
    assert run(tmp_path / "split", data_dir, *common) == 0
    assert train_lines(tmp_path / "split") == train_lines(tmp_path / "straight")
    assert sorted(train_lines(tmp_path / "split")) == [4, 8]


def test_restore_onto_a_different_mesh(tmp_path, data_dir):
    assert (
        run(
            tmp_path,
            data_dir,
            "--config.total_steps=2",
            "--config.mesh.data=1",
            "--config.mesh.fsdp=8",
            "--config.mesh.strategy=fsdp",
            "--config.model.num_kv_heads=4",
        )
        == 0
    )
    _, on_one, _, _ = restore_params(tmp_path, (1, 1, 1), "dp")
    _, on_other, _, _ = restore_params(tmp_path, (2, 1, 4), "tp")
    q = on_other.params["layers"]["attn"]["q"]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, None, "tensor", None)
    for x, y in zip(jax.tree.leaves(on_one), jax.tree.leaves(on_other), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_damaged_checkpoint_is_reported_and_skipped(tmp_path, data_dir, capsys):
    common = ["--config.checkpoint.every_steps=5", "--config.eval.every_steps=0"]
    assert run(tmp_path, data_dir, "--config.total_steps=10", *common) == 0
    state_dir = tmp_path / "checkpoints" / "10" / "state"
    data_files = [p for p in state_dir.rglob("*") if p.is_file() and p.stat().st_size > 1000]
    for path in data_files:  # truncate the array data
        path.write_bytes(path.read_bytes()[:100])
    capsys.readouterr()
    assert run(tmp_path, data_dir, "--config.total_steps=12", *common) == 0
    err = capsys.readouterr().err
    assert "checkpoints/10 is damaged" in err and "resuming from checkpoint step 5" in err
    assert (tmp_path / "checkpoints_damaged" / "10").is_dir()  # kept, not deleted
    assert restore_params(tmp_path)[0] == 12


def test_sigterm_checkpoints_and_resume_matches(tmp_path, data_dir):
    common = [
        "--config.total_steps=40",
        "--config.log.every_steps=1",
        "--config.eval.every_steps=0",
        "--config.checkpoint.every_steps=0",
    ]
    assert run(tmp_path / "straight", data_dir, *common) == 0
    proc = subprocess_pretrain(tmp_path / "split", data_dir, *common)
    metrics = tmp_path / "split" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert "SIGTERM at step" in stderr
    stopped = restore_params(tmp_path / "split")[0]
    assert 3 <= stopped < 40
    assert run(tmp_path / "split", data_dir, *common) == 0
    assert train_lines(tmp_path / "straight") == train_lines(tmp_path / "split")


def test_kill_9_during_async_saves_leaves_a_restorable_checkpoint(tmp_path, data_dir):
    common = [
        "--config.total_steps=200",
        "--config.checkpoint.every_steps=1",
        "--config.checkpoint.max_to_keep=2",
        "--config.eval.every_steps=0",
    ]
    proc = subprocess_pretrain(tmp_path, data_dir, *common)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        done = (
            list((tmp_path / "checkpoints").glob("[0-9]*/commit_success.txt"))
            if (tmp_path / "checkpoints").exists()
            else []
        )
        if len(done) >= 3:
            break
        time.sleep(0.05)
    proc.kill()  # SIGKILL while saves are in flight every step
    proc.communicate()
    step, _, data_state, _ = restore_params(tmp_path)
    assert step >= 1 and data_state
    assert run(tmp_path, data_dir, "--config.total_steps=" + str(step + 2), *common[1:]) == 0


def test_nonfinite_loss_stops_without_a_checkpoint(tmp_path, data_dir, capsys):
    code = run(
        tmp_path,
        data_dir,
        "--config.optim.lr=1e9",
        "--config.optim.clip_norm=0",
        "--config.total_steps=30",
        "--config.checkpoint.every_steps=1",
        "--config.log.every_steps=1",
        "--config.eval.every_steps=0",
    )
    err = capsys.readouterr().err
    assert code == 3 and "non-finite loss or gradient at step" in err
    bad_step = int(err.split("at step ")[1].split()[0])
    saved = [int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
    assert all(s < bad_step for s in saved)


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.optim.lrr=1", "--config.optim.lrr: unknown key"),
        ("--config.optim.lr=-1", "optim.lr=-1.0: must be positive"),
        ("--config.mesh.data=3", "mesh.data=3"),
        ("--config.data.path=/nonexistent/*.txt", "no file matches"),
        ("--config.total_steps=ten", "expected int"),
        ("--config.model.num_kv_heads=3", "model.num_kv_heads=3"),
    ],
)
def test_bad_config_is_one_line_and_writes_nothing(tmp_path, data_dir, override, message):
    env = dict(os.environ, PYTHONPATH=str(ROOT), XLA_FLAGS="")
    workdir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "orchestrate.cli", "pretrain", *args(workdir, data_dir, override)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert message in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not workdir.exists()


def test_resuming_with_another_model_shape_is_refused_before_any_write(tmp_path, data_dir, capsys):
    assert run(tmp_path, data_dir, "--config.total_steps=2", "--config.eval.every_steps=0") == 0
    config_before = (tmp_path / "config.json").read_text()
    steps_before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    capsys.readouterr()
    code = run(
        tmp_path,
        data_dir,
        "--config.total_steps=4",
        "--config.eval.every_steps=0",
        "--config.model.num_layers=3",
    )
    err = capsys.readouterr().err
    assert code == 2 and "model.num_layers: 2 -> 3" in err
    assert (tmp_path / "config.json").read_text() == config_before
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == steps_before
    assert not (tmp_path / "checkpoints_damaged").exists()
    # A numerics-only change (remat) resumes.
    assert (
        run(
            tmp_path,
            data_dir,
            "--config.total_steps=3",
            "--config.eval.every_steps=0",
            "--config.model.remat_policy=full",
        )
        == 0
    )


def test_a_batch_the_mesh_cannot_split_is_refused(tmp_path, data_dir, capfd):
    """12 rows over the 8 devices of the data axis: one line naming batch_size, before any
    write (it used to fail inside jax at the first step)."""
    workdir = tmp_path / "run"
    assert pretrain.main(args(workdir, data_dir, "--config.batch_size=12")) == 2
    err = capfd.readouterr().err
    assert "batch_size=12 does not divide over the 8 devices" in err, err[-2000:]
    assert not workdir.exists()


def test_cpu_devices_share_the_hosts_measured_peak(monkeypatch):
    """The test process's 8 CPU devices share one host: MFU is against the host's
    measured peak, not 8 times it."""
    from train import metrics

    monkeypatch.setattr(metrics, "measure_matmul_flops", lambda: 8e9)
    per_device = metrics.peak_flops_per_device()
    assert jax.device_count() == 8 and per_device == 1e9
    assert metrics.mfu(1000.0, 2e6, per_device) == pytest.approx(1000.0 * 2e6 / 8e9)
    assert metrics.peak_flops_per_device(override=5e11) == 5e11
