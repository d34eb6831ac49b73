"""Checkpoint integrity manifests and one-line save errors (train/integrity.py,
train/checkpoint.py), on a tiny array tree: no model, no CLI."""

from __future__ import annotations

import asyncio
import json
import logging
import pathlib
import re
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train import checkpoint as ck
from train.integrity import MANIFEST, integrity_problem, write_manifest
from train.parent import InitFromError, Parent, load_params


def flip_byte(path: pathlib.Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def array_files(step_dir: pathlib.Path) -> list[pathlib.Path]:
    """The OCDBT data files of a step, largest first."""
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and "/d/" in str(p)]
    return sorted(files, key=lambda p: -p.stat().st_size)


def state_at(step: int) -> dict:
    # Large enough that OCDBT stores the array in a data file rather than inline.
    return {"w": jnp.arange(4096, dtype=jnp.float32) * step, "step": jnp.int32(step)}


def abstract(state: dict) -> dict:
    def spec(x):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)

    return jax.tree.map(spec, state)


def saved_run(workdir: pathlib.Path, steps=(1, 2)) -> ck.Checkpointer:
    checkpointer = ck.Checkpointer(workdir, max_to_keep=3)
    for step in steps:
        checkpointer.save(step, state_at(step), {"i": step}, {"stage": "test"})
    checkpointer.wait()
    return checkpointer


# ----------------------------------------------------------------------------- manifest


@pytest.fixture
def step_dir(tmp_path: pathlib.Path) -> pathlib.Path:
    step = tmp_path / "7"
    (step / "state" / "d").mkdir(parents=True)
    (step / "state" / "d" / "abc").write_bytes(bytes(range(256)) * 40)
    (step / "meta").mkdir()
    (step / "meta" / "metadata").write_text('{"stage": "test"}')
    write_manifest(step)
    return step


def test_manifest_lists_every_file_but_itself(step_dir):
    files = json.loads((step_dir / MANIFEST).read_text())["files"]
    assert sorted(files) == ["meta/metadata", "state/d/abc"]
    assert files["state/d/abc"]["size"] == 10240
    assert integrity_problem(step_dir) is None
    assert not (step_dir / (MANIFEST + ".tmp")).exists()


@pytest.mark.parametrize(
    "damage, expected",
    [
        (flip_byte, "state/d/abc does not match its sha256"),
        (lambda p: p.write_bytes(p.read_bytes()[:100]), "state/d/abc has 100 bytes"),
        (lambda p: p.unlink(), "state/d/abc is missing"),
    ],
    ids=["flipped byte", "truncated", "deleted"],
)
def test_manifest_names_the_damaged_file(step_dir, damage, expected):
    damage(step_dir / "state" / "d" / "abc")
    assert expected in integrity_problem(step_dir)


def test_unreadable_manifest_is_damage_and_missing_one_is_not(step_dir):
    (step_dir / MANIFEST).write_text('{"files": ')
    assert "integrity.json is unreadable" in integrity_problem(step_dir)
    (step_dir / MANIFEST).unlink()
    with pytest.raises(FileNotFoundError):
        integrity_problem(step_dir)


def test_files_added_after_the_manifest_are_ignored(step_dir):
    (step_dir / "extra.txt").write_text("not listed")
    assert integrity_problem(step_dir) is None


# ----------------------------------------------------------------------------- Checkpointer


def test_every_finalized_save_gets_a_manifest_and_restore_is_unchanged(tmp_path):
    checkpointer = saved_run(tmp_path)
    for step in (1, 2):
        assert integrity_problem(tmp_path / "checkpoints" / str(step)) is None
    step, state, data, meta = checkpointer.restore(abstract(state_at(0)))
    checkpointer.close()
    assert (step, data, meta) == (2, {"i": 2}, {"stage": "test"})
    np.testing.assert_array_equal(np.asarray(state["w"]), np.asarray(state_at(2)["w"]))
    # Restoring writes nothing into the step: its manifest still matches.
    assert integrity_problem(tmp_path / "checkpoints" / "2") is None


def test_synchronous_saves_get_a_manifest_too(tmp_path):
    checkpointer = ck.Checkpointer(tmp_path, async_save=False)
    checkpointer.save(5, state_at(5), None, {"stage": "test"})
    assert integrity_problem(tmp_path / "checkpoints" / "5") is None
    checkpointer.close()


def test_flipped_byte_is_damage_and_the_previous_step_is_used(tmp_path, capsys):
    saved_run(tmp_path).close()
    flip_byte(array_files(tmp_path / "checkpoints" / "2")[0])
    checkpointer = ck.Checkpointer(tmp_path)
    step, state, _, _ = checkpointer.restore(abstract(state_at(0)))
    checkpointer.close()
    err = capsys.readouterr().err
    assert step == 1 and int(state["step"]) == 1
    assert f"checkpoint {tmp_path / 'checkpoints' / '2'} is damaged (integrity check" in err
    assert (tmp_path / "checkpoints_damaged" / "2").is_dir()
    assert not (tmp_path / "checkpoints" / "2").exists()


def test_explicit_step_that_is_damaged_raises_and_stays(tmp_path):
    checkpointer = saved_run(tmp_path)
    flip_byte(array_files(tmp_path / "checkpoints" / "2")[0])
    with pytest.raises(ck.CheckpointDamagedError, match="does not match its sha256"):
        checkpointer.restore(abstract(state_at(0)), step=2)
    checkpointer.close()
    assert (tmp_path / "checkpoints" / "2").is_dir()


def test_step_without_manifest_restores_with_a_warning(tmp_path, capsys):
    """An older checkpoint, or kill -9 between Orbax's finalization and the manifest."""
    saved_run(tmp_path).close()
    (tmp_path / "checkpoints" / "2" / MANIFEST).unlink()
    (tmp_path / "checkpoints" / "2" / (MANIFEST + ".tmp")).write_text('{"fil')  # cut short
    checkpointer = ck.Checkpointer(tmp_path)
    step, _, _, _ = checkpointer.restore(abstract(state_at(0)))
    checkpointer.close()
    assert step == 2
    err = capsys.readouterr().err
    assert "has no integrity.json" in err and "restored without verifying" in err
    assert not (tmp_path / "checkpoints_damaged").exists()


def test_init_from_a_damaged_checkpoint_is_refused(tmp_path):
    saved_run(tmp_path).close()
    flip_byte(array_files(tmp_path / "checkpoints" / "2")[0])
    parent = Parent(tmp_path / "checkpoints" / "2", 2, {"model": {"d_model": 1}})
    with pytest.raises(InitFromError, match=r"checkpoints/2 is damaged \(state/"):
        load_params(parent, {})


# ----------------------------------------------------------------------------- save errors


def test_failed_background_save_is_one_line_naming_the_step(tmp_path, monkeypatch):
    checkpointer = ck.Checkpointer(tmp_path)
    checkpointer.save(1, state_at(1), None, {"stage": "test"})
    real_wait = checkpointer.manager.wait_until_finished

    def failing_wait() -> None:
        real_wait()  # let the real save finish, then report what a full disk reports
        raise ValueError(
            'OUT_OF_RANGE: Error writing "w/0": Failed to write 410343 bytes to file 8: '
            "No space left on device [os_error_code='28'] [tensorstore_spec='{...}']"
        )

    monkeypatch.setattr(checkpointer.manager, "wait_until_finished", failing_wait)
    with pytest.raises(ck.CheckpointSaveError) as caught:
        checkpointer.save(2, state_at(2), None, {"stage": "test"})
    assert str(caught.value) == (
        f"saving checkpoint 1 to {tmp_path / 'checkpoints' / '1'} failed: "
        "[Errno 28] No space left on device"
    )
    monkeypatch.setattr(checkpointer.manager, "wait_until_finished", real_wait)
    checkpointer.close()  # nothing pending any more: closes quietly


@pytest.mark.parametrize(
    "err, expected",
    [
        (OSError(27, "File too large"), "[Errno 27] File too large"),
        (RuntimeError("wrapped"), "[Errno 28] No space left on device"),
        (ValueError("bad thing\nmore detail [tensorstore_spec='{}']"), "bad thing"),
        (ValueError(""), "ValueError"),
    ],
)
def test_describe_save_error(err, expected):
    if str(err) == "wrapped":
        err.__cause__ = OSError(28, "No space left on device")
    assert ck.describe_save_error(err) == expected


def test_background_save_noise_is_dropped_and_the_rest_kept():
    noise = ck._DropBackgroundSaveNoise()

    def record(name: str, path: str, msg: str, exc: bool) -> logging.LogRecord:
        info = (ValueError, ValueError("x"), None) if exc else None
        return logging.LogRecord(name, logging.ERROR, path, 1, msg, None, info)

    orbax_file = "/venv/site-packages/orbax/checkpoint/checkpoint_manager.py"
    assert not noise.filter(record("absl", orbax_file, "save failed", True))
    assert noise.filter(record("absl", orbax_file, "a plain orbax line", False))
    assert noise.filter(record("absl", "/work/main/train/loop.py", "ours", True))
    task = "Task exception was never retrieved\nfuture: <Task coro=<f() at /x/orbax/y.py>>"
    assert not noise.filter(record("asyncio", "/asyncio/base_events.py", task, True))
    assert noise.filter(record("asyncio", "/asyncio/base_events.py", "other task", True))


def test_only_callbacks_into_a_closed_event_loop_are_silenced(tmp_path, capsys):
    ck.Checkpointer(tmp_path).close()  # installs the hook
    loop = asyncio.new_event_loop()
    loop.close()
    try:
        loop.call_soon_threadsafe(print)
    except RuntimeError as err:
        closed = types.SimpleNamespace(exc_value=err, exc_traceback=err.__traceback__)
    try:
        raise RuntimeError("something else")
    except RuntimeError as err:
        other = types.SimpleNamespace(exc_value=err, exc_traceback=err.__traceback__)
    assert ck._closed_loop_callback(closed)
    assert not ck._closed_loop_callback(other)
    sys.unraisablehook(closed)
    assert capsys.readouterr().err == ""


# ------------------------------------------------ parameter-shape fields of a parent/resume


def test_norm_position_and_learned_table_length_are_shape_fields():
    """A child of a parent, or a resumed run, may not change norm, position, or (with a
    learned position table) max_seq_len; a meta from before norm/position existed reads
    as rmsnorm + rope. Numerics such as dropout still may change."""
    from train.parent import child_model_dict
    from train.stage import StageError, check_model_shape

    old_meta = {"vocab_size": 64, "d_model": 32, "max_seq_len": 64, "dropout_rate": 0.0}
    parent = Parent(pathlib.Path("/p/checkpoints/5"), 5, {"model": old_meta})
    assert child_model_dict(parent, {"norm": "rmsnorm", "position": "rope"})["norm"] == "rmsnorm"
    assert child_model_dict(parent, {"max_seq_len": 128, "dropout_rate": 0.1})["max_seq_len"] == 128
    for key, value in (("norm", "layernorm"), ("position", "learned")):
        with pytest.raises(InitFromError, match=re.escape(f"model.{key}={value!r}")):
            child_model_dict(parent, {key: value})
    learned = Parent(parent.checkpoint, 5, {"model": {**old_meta, "position": "learned"}})
    with pytest.raises(InitFromError, match=re.escape("model.max_seq_len=128")):
        child_model_dict(learned, {"max_seq_len": 128})

    current = {**old_meta, "norm": "rmsnorm", "position": "rope", "max_seq_len": 128}
    check_model_shape(old_meta, current)  # an old meta resumes; max_seq_len is numerics
    with pytest.raises(StageError, match=re.escape("model.norm: 'rmsnorm' -> 'layernorm'")):
        check_model_shape(old_meta, {**current, "norm": "layernorm"})
    with pytest.raises(StageError, match=re.escape("model.max_seq_len: 64 -> 128")):
        check_model_shape({**old_meta, "position": "learned"}, {**current, "position": "learned"})
