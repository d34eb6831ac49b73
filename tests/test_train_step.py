"""The sharded train step: mesh invariance, gradient accumulation, determinism, overfitting."""

import functools
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from model import sharding as sh
from model.config import get_preset
from model.transformer import Transformer
from train import cpu, losses, optim
from train.optim import make_optimizer
from train.state import create_train_state
from train.step import jit_train_step, make_train_step

TINY = get_preset("tiny")


def random_batch(seed: int, batch: int = 8, seq_len: int = 32, ragged_mask: bool = True):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, TINY.vocab_size, (batch, seq_len + 1))
    mask = np.ones((batch, seq_len), np.float32)
    if ragged_mask:  # rows count different numbers of tokens, so weighting matters
        for row in range(batch):
            mask[row, rng.integers(1, seq_len) :] = 0.0
    return {
        "inputs": jnp.asarray(tokens[:, :-1], jnp.int32),
        "targets": jnp.asarray(tokens[:, 1:], jnp.int32),
        "loss_mask": jnp.asarray(mask),
    }


def assert_trees_close(actual, expected, rtol=1e-5):
    """Per array: ||actual - expected|| <= rtol * ||expected|| (elementwise relative error
    is meaningless for near-zero entries, which Adam's normalized update moves by ~lr)."""
    for a, b in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert np.linalg.norm(a - b) <= rtol * np.linalg.norm(b), np.abs(a - b).max()


def run_steps(
    mesh_shape,
    strategy,
    steps=3,
    grad_accum_steps=1,
    optimizer="adamw",
    batches=None,
    lr=1e-3,
    cfg=TINY,
):
    devices = jax.devices()[: int(np.prod(mesh_shape))]
    mesh = sh.make_mesh(*mesh_shape, devices=devices)
    rules = sh.get_rules(strategy)
    model = Transformer(cfg)
    tx, lr_fn = make_optimizer(optimizer, lr=lr, total_steps=100, warmup_steps=2)
    state, shardings = create_train_state(model, tx, mesh, rules, seed=0)
    step = jit_train_step(
        make_train_step(model, tx, lr_fn, grad_accum_steps), shardings, mesh, rules
    )
    history = []
    for i in range(steps):
        state, metrics = step(state, batches[i] if batches else random_batch(i))
        history.append(jax.tree.map(float, metrics))
    return state, history


@functools.cache
def single_device_reference():
    return run_steps((1, 1, 1), "dp")


@pytest.mark.parametrize(
    "mesh_shape, strategy",
    [
        ((8, 1, 1), "dp"),
        ((1, 8, 1), "fsdp"),
        ((2, 2, 2), "fsdp_tp"),
        ((4, 1, 2), "tp"),
    ],
)
def test_sharded_training_equals_single_device(mesh_shape, strategy):
    ref_state, ref_hist = single_device_reference()
    state, hist = run_steps(mesh_shape, strategy)
    for ref, got in zip(ref_hist, hist, strict=True):
        np.testing.assert_allclose(got["loss"], ref["loss"], rtol=1e-5)
        np.testing.assert_allclose(got["grad_norm"], ref["grad_norm"], rtol=1e-5)
    assert_trees_close(state.params, ref_state.params)


def test_parameters_are_actually_sharded():
    state, _ = run_steps((2, 2, 2), "fsdp_tp", steps=1)
    q = state.params["layers"]["attn"]["q"]  # [L, D, N, H]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    shard_shape = q.addressable_shards[0].data.shape
    assert shard_shape == (q.shape[0], q.shape[1] // 2, q.shape[2] // 2, q.shape[3])
    mu = state.opt_state[1][0].mu["layers"]["attn"]["q"]  # Adam moment follows its param
    assert mu.sharding.spec == q.sharding.spec


def test_gradient_accumulation_equals_one_big_batch():
    batches = [random_batch(10 + i) for i in range(2)]
    big_state, big = run_steps((1, 2, 1), "fsdp", steps=2, batches=batches)
    acc_state, acc = run_steps((1, 2, 1), "fsdp", steps=2, batches=batches, grad_accum_steps=4)
    for a, b in zip(big, acc, strict=True):
        np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-5)
        np.testing.assert_allclose(b["grad_norm"], a["grad_norm"], rtol=1e-5)
        assert a["num_tokens"] == b["num_tokens"]
    assert_trees_close(acc_state.params, big_state.params)


def test_reported_loss_is_the_masked_token_mean():
    batch = random_batch(20)
    mesh = sh.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    rules = sh.get_rules("dp")
    model = Transformer(TINY)
    tx, lr_fn = make_optimizer(lr=1e-3, total_steps=10)
    state, shardings = create_train_state(model, tx, mesh, rules, seed=0)
    logits = model.apply({"params": state.params}, batch["inputs"]).logits
    logp = jax.nn.log_softmax(np.asarray(logits, np.float64), axis=-1)
    nll = -np.take_along_axis(np.asarray(logp), np.asarray(batch["targets"])[..., None], -1)
    mask = np.asarray(batch["loss_mask"])
    expected = (nll[..., 0] * mask).sum() / mask.sum()
    step = jit_train_step(make_train_step(model, tx, lr_fn), shardings, mesh, rules)
    _, metrics = step(state, batch)
    np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=1e-5)
    assert float(metrics["num_tokens"]) == mask.sum()


def test_cross_entropy_z_loss_and_empty_mask():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 5)), jnp.float32)
    targets = jnp.zeros((2, 3), jnp.int32)
    plain, count = losses.cross_entropy(logits, targets)
    with_z, _ = losses.cross_entropy(logits, targets, z_loss=1e-2)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    np.testing.assert_allclose(with_z - plain, 1e-2 * jnp.mean(log_z**2), rtol=1e-5)
    assert count == 6
    empty, count = losses.cross_entropy(logits, targets, jnp.zeros((2, 3)))
    assert float(empty) == 0.0 and float(count) == 0.0
    with pytest.raises(ValueError, match="mask"):
        losses.cross_entropy(logits, targets, jnp.zeros((2, 4)))


def test_step_is_deterministic_and_donates_the_state():
    cfg = TINY.replace(dropout_rate=0.1)  # dropout draws from the state's RNG
    mesh = sh.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    rules = sh.get_rules("dp")
    model = Transformer(cfg)
    tx, lr_fn = make_optimizer(lr=1e-3, total_steps=10)
    step = jit_train_step(
        make_train_step(model, tx, lr_fn),
        create_train_state(model, tx, mesh, rules, 0)[1],
        mesh,
        rules,
    )

    def losses_from(state):
        out = []
        for i in range(2):
            state, metrics = step(state, random_batch(i))
            out.append(float(metrics["loss"]))
        return out

    first_state = create_train_state(model, tx, mesh, rules, seed=0)[0]
    first = losses_from(first_state)
    assert first_state.params["embedding"].is_deleted()  # donated: no second copy
    assert first == losses_from(create_train_state(model, tx, mesh, rules, seed=0)[0])
    other_rng = create_train_state(model, tx, mesh, rules, seed=0)[0]
    other_rng = other_rng.replace(rng=other_rng.rng + 1)  # same weights, other dropout masks
    assert losses_from(other_rng) != first


@pytest.mark.parametrize("optimizer", ["lion", "adafactor", "muon"])
def test_other_optimizers_train_sharded(optimizer):
    batch = random_batch(30, ragged_mask=False)
    state, hist = run_steps(
        (1, 4, 2), "fsdp_tp", steps=8, optimizer=optimizer, batches=[batch] * 8, lr=3e-3
    )
    assert hist[-1]["loss"] < hist[0]["loss"] - 0.1
    # Optimizer moments live with their parameter's shards (Muon's masked state too).
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.shape == (256, 64)]
    assert moments and all(not x.sharding.is_fully_replicated for x in moments)


def matrix_view(name: str, value: np.ndarray) -> np.ndarray:
    """[layers, reduction, output] as Muon sees a q/k/v, o or MLP parameter."""
    n_out = 2 if name in ("q", "k", "v") else 1
    n_in = 2 if name == "o" else 1
    shape = value.shape[value.ndim - n_in - n_out :]
    rows = int(np.prod(shape[:n_in]))
    return value.reshape(-1, rows, int(np.prod(shape[n_in:])))


def spread_gradient(name: str, shape: tuple, rng: np.random.Generator) -> np.ndarray:
    """A gradient whose Muon matrices have singular values spread over [0.5, 2]."""
    if name not in optim.MUON_AXES:
        return rng.normal(size=shape).astype(np.float32)
    out = np.empty_like(matrix_view(name, np.zeros(shape, np.float32)))
    for i in range(out.shape[0]):
        left, _ = np.linalg.qr(rng.normal(size=(out.shape[1], min(out.shape[1:]))))
        right, _ = np.linalg.qr(rng.normal(size=(out.shape[2], min(out.shape[1:]))))
        out[i] = left @ np.diag(rng.uniform(0.5, 2.0, min(out.shape[1:]))) @ right.T
    return out.reshape(shape)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_muon_orthogonalizes_the_matrices_and_leaves_the_rest_to_adamw(scan_layers):
    """First Muon step, against numpy's SVD: each attention / MLP matrix (reduction axes x
    output axes, per layer) moves along -U V^T of its gradient, the 4x spread of the
    gradient's singular values flattened; the embedding and norm scales get the first
    step of a Nesterov AdamW: bias-corrected m = g (1 + 2 b1) / (1 + b1), v = g^2."""
    lr = 1e-2
    model = Transformer(TINY.replace(scan_layers=scan_layers))
    params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))["params"]
    rng = np.random.default_rng(0)
    grads = jax.tree_util.tree_map_with_path(
        lambda path, p: spread_gradient(path[-1].key, p.shape, rng), params
    )
    tx, _ = make_optimizer("muon", lr=lr, total_steps=10, weight_decay=0.0, clip_norm=0.0)
    updates, _ = tx.update(grads, tx.init(params), params)
    flat_grads = dict(jax.tree_util.tree_leaves_with_path(grads))
    checked = 0
    for path, update in jax.tree_util.tree_leaves_with_path(updates):
        name, grad = path[-1].key, flat_grads[path]
        if name not in optim.MUON_AXES:
            assert name in ("embedding", "scale"), name
            nesterov = (1 + 2 * 0.9) / (1 + 0.9)
            np.testing.assert_allclose(update, -lr * nesterov * np.sign(grad), rtol=1e-3)
            continue
        views = matrix_view(name, grad), matrix_view(name, np.asarray(update))
        for g, u in zip(*views, strict=True):
            left, _, right = np.linalg.svd(g, full_matrices=False)
            polar = left @ right
            cosine = np.sum(-u * polar) / (np.linalg.norm(u) * np.linalg.norm(polar))
            singular = np.linalg.svd(u, compute_uv=False)
            assert cosine > 0.97, (name, cosine)
            assert singular.max() / singular.min() < 2.0, (name, singular)
            checked += 1
    assert checked == TINY.num_layers * 7


def test_tiny_model_overfits_one_batch():
    batch = random_batch(42, batch=4, seq_len=32, ragged_mask=False)
    _, hist = run_steps((1, 1, 1), "dp", steps=300, batches=[batch] * 300, lr=1e-2)
    losses_seen = [h["loss"] for h in hist]
    assert min(losses_seen) < 0.05, losses_seen[-5:]


def test_scan_keeps_the_program_size_independent_of_depth():
    sizes = []
    for layers in (2, 12):
        cfg = TINY.replace(num_layers=layers)
        mesh = sh.make_mesh(1, 1, 1, devices=jax.devices()[:1])
        rules = sh.get_rules("dp")
        model = Transformer(cfg)
        tx, lr_fn = make_optimizer(lr=1e-3, total_steps=10)
        state, shardings = create_train_state(model, tx, mesh, rules, seed=0)
        step = jit_train_step(make_train_step(model, tx, lr_fn), shardings, mesh, rules)
        sizes.append(len(step.lower(state, random_batch(0)).as_text().splitlines()))
    assert sizes[0] == sizes[1]


def test_mesh_errors_name_the_axes():
    with pytest.raises(ValueError, match=r"mesh.data=3.*does not divide the 8 devices"):
        sh.make_mesh(3, -1, 1)
    with pytest.raises(ValueError, match="uses 4 devices but 8"):
        sh.make_mesh(2, 2, 1)
    with pytest.raises(ValueError, match="at most one axis may be -1"):
        sh.make_mesh(-1, -1, 1)
    assert dict(sh.make_mesh(2, -1, 2).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    with pytest.raises(ValueError, match=r"mesh\.strategy='zero'"):
        sh.get_rules("zero")


def test_indivisible_sharding_names_the_parameter():
    cfg = TINY.replace(num_kv_heads=1)  # MQA: one kv head cannot be split over tensor=2
    mesh = sh.make_mesh(1, 1, 2, devices=jax.devices()[:2])
    tx, _ = make_optimizer(lr=1e-3, total_steps=10)
    with pytest.raises(ValueError, match=r"\['attn'\]\['k'\].*cannot be split"):
        create_train_state(Transformer(cfg), tx, mesh, sh.get_rules("tp"), seed=0)


def test_schedules_by_hand():
    _, warm_cos = make_optimizer(
        schedule="cosine", lr=1.0, total_steps=110, warmup_steps=10, min_lr_ratio=0.1
    )
    assert float(warm_cos(0)) == pytest.approx(0.1)
    assert float(warm_cos(9)) == pytest.approx(1.0)
    assert float(warm_cos(10 + 50)) == pytest.approx(0.1 + 0.9 * 0.5, rel=1e-5)
    assert float(warm_cos(110)) == pytest.approx(0.1, rel=1e-5)
    _, wsd = make_optimizer(
        schedule="wsd",
        lr=2.0,
        total_steps=100,
        warmup_steps=0,
        min_lr_ratio=0.0,
        decay_fraction=0.2,
    )
    assert float(wsd(79)) == pytest.approx(2.0)
    assert float(wsd(90)) == pytest.approx(1.0, rel=1e-5)
    _, linear = make_optimizer(schedule="linear", lr=1.0, total_steps=100, min_lr_ratio=0.0)
    assert float(linear(25)) == pytest.approx(0.75)
    _, constant = make_optimizer(schedule="constant", lr=0.5, total_steps=100)
    assert float(constant(99)) == 0.5


def test_weight_decay_skips_norms_and_biases():
    params = {
        "layers": {"attn_norm": {"scale": jnp.ones((2, 4))}, "mlp": {"up": jnp.ones((2, 4, 4))}},
        "scalar_bias": jnp.ones(()),
        "embedding": jnp.ones((8, 4)),
    }
    tx, _ = make_optimizer("adamw", lr=0.1, schedule="constant", weight_decay=0.5, clip_norm=0)
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero_grads, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    assert float(new["layers"]["attn_norm"]["scale"][0, 0]) == 1.0
    assert float(new["scalar_bias"]) == 1.0
    assert float(new["layers"]["mlp"]["up"][0, 0, 0]) == pytest.approx(1.0 - 0.1 * 0.5)
    assert float(new["embedding"][0, 0]) == pytest.approx(1.0 - 0.1 * 0.5)


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"name": "sgdx"}, "optim.name"),
        ({"lr": -1.0}, "optim.lr"),
        ({"schedule": "step"}, "optim.schedule"),
        ({"warmup_steps": 5000}, "optim.warmup_steps"),
        ({"name": "muon", "ns_steps": 0}, "optim.ns_steps"),
    ],
)
def test_bad_optimizer_settings_name_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key):
        make_optimizer(**kwargs)


def test_skip_nonfinite_keeps_the_state_and_counts():
    mesh = sh.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    rules = sh.get_rules("dp")
    model = Transformer(TINY)
    tx, lr_fn = make_optimizer(lr=1e-3, total_steps=10)
    state, shardings = create_train_state(model, tx, mesh, rules, seed=0)
    before = jax.tree.map(np.asarray, state.params)
    step = jit_train_step(
        make_train_step(model, tx, lr_fn, skip_nonfinite=True), shardings, mesh, rules
    )
    poisoned = random_batch(0)
    poisoned["loss_mask"] = poisoned["loss_mask"].at[0, 0].set(jnp.nan)
    state, metrics = step(state, poisoned)
    assert int(metrics["skipped"]) == 1 and not np.isfinite(float(metrics["loss"]))
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(state.params), strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))
    state, metrics = step(state, random_batch(1))
    assert int(metrics["skipped"]) == 0 and int(state.step) == 2


CORES_AS_DEVICES_RUN = """
import json, os, sys
sys.path.insert(0, os.getcwd())
from train import cpu
cpu.cores_as_devices(2)
import jax
from tests.test_train_step import run_steps
_, history = run_steps((2, 1, 1), "dp")
print(json.dumps({"devices": len(jax.devices()), "flags": os.environ["XLA_FLAGS"],
                  "loss": [h["loss"] for h in history],
                  "grad_norm": [h["grad_norm"] for h in history]}))
"""


def test_cores_as_devices_trains_like_one_device():
    """train/cpu.py's devices, one per core (a fresh process: XLA reads the flags once),
    train data parallel to the single-device losses; asked too late, it refuses."""
    root = pathlib.Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", CORES_AS_DEVICES_RUN],
        cwd=root,
        env={**os.environ, "XLA_FLAGS": ""},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["devices"] == 2
    assert all(flag in got["flags"] for flag in cpu.DEVICE_FLAGS)
    _, ref = single_device_reference()
    np.testing.assert_allclose(got["loss"], [h["loss"] for h in ref], rtol=1e-5)
    np.testing.assert_allclose(got["grad_norm"], [h["grad_norm"] for h in ref], rtol=1e-5)
    with pytest.raises(RuntimeError, match="already started"):
        cpu.cores_as_devices(2)


def all_reduces(mesh_shape, strategy, grad_accum_steps=1):
    """The all-reduce instructions of the compiled step on a mesh of that shape."""
    mesh = sh.make_mesh(*mesh_shape, devices=jax.devices()[: int(np.prod(mesh_shape))])
    rules = sh.get_rules(strategy)
    model = Transformer(TINY)
    tx, lr_fn = make_optimizer(lr=1e-3, total_steps=100)
    state, shardings = create_train_state(model, tx, mesh, rules, seed=0)
    step = jit_train_step(
        make_train_step(model, tx, lr_fn, grad_accum_steps), shardings, mesh, rules
    )
    hlo = step.lower(state, random_batch(0)).compile().as_text()
    return [line for line in hlo.splitlines() if " all-reduce(" in line]


def test_data_parallel_cpu_step_reduces_all_sums_in_one_buffer():
    """On a CPU mesh that only splits the batch, the loss, token count and every gradient
    travel in one flat all-reduce; with parameters sharded, XLA's own reductions stay."""
    n_params = sum(x.size for x in jax.tree.leaves(single_device_reference()[0].params))
    for accum in (1, 2):
        (line,) = all_reduces((2, 1, 1), "dp", accum)
        assert f"f32[{n_params + 2}]" in line.split("all-reduce(")[0], line
    assert len(all_reduces((1, 2, 1), "fsdp")) > 1


@pytest.mark.parametrize("mesh_shape, accum", [((2, 1, 1), 4), ((8, 1, 1), 4)])
def test_data_parallel_accumulation_equals_one_big_batch(mesh_shape, accum):
    """Each shard accumulates its own rows (2 x 4 rows into 4 microbatches), or, when its
    rows do not divide (8 x 1 row), the whole batch is accumulated as on one device."""
    batches = [random_batch(10 + i) for i in range(2)]
    big_state, big = run_steps((1, 1, 1), "dp", steps=2, batches=batches)
    acc_state, acc = run_steps(mesh_shape, "dp", steps=2, batches=batches, grad_accum_steps=accum)
    for a, b in zip(big, acc, strict=True):
        np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-5)
        np.testing.assert_allclose(b["grad_norm"], a["grad_norm"], rtol=1e-5)
        assert a["num_tokens"] == b["num_tokens"]
    assert_trees_close(acc_state.params, big_state.params)
